//! The openraft type configuration: what a log entry carries (`Batch`), what applying it
//! returns (`BatchResponse`) and how cluster members are addressed (`Member`).

use serde::{Deserialize, Serialize};

use crate::state::{Batch, BatchResponse};

/// A node's id in the cluster (1, 2, 3 … as configured).
pub type NodeId = u64;

/// How to reach a cluster member: its public API and its peer (Raft) address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Member {
    pub api_addr: String,
    pub peer_addr: String,
    /// The identity of the disk the node held when it joined ([`super::db::Db::disk_id`]):
    /// Raft calls carry it and a node whose disk is another (wiped, replaced) refuses
    /// them, so it neither votes nor takes a log it once acknowledged and lost. Absent
    /// for members that joined before it existed (not checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "api={} peer={}", self.api_addr, self.peer_addr)
    }
}

openraft::declare_raft_types!(
    /// The orchestrator's Raft types.
    pub TypeConfig:
        D = Batch,
        R = BatchResponse,
        NodeId = NodeId,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, Member>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Member>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type RaftMetrics = openraft::RaftMetrics<NodeId, Member>;

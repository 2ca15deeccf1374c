//! One node's Raft: starting openraft over the RocksDB stores, safe cluster formation,
//! writes (proposed locally on the leader, forwarded one hop otherwise, retried with the
//! same request ids until a bounded deadline), current reads through the leader's read
//! index, membership changes and the status the API reports.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::clock::{self, ClusterClock};
use super::db::Db;
use super::log_store::LogStore;
use super::network::{NetworkFactory, PeerClients};
use super::read_rounds::ReadRounds;
use super::state_machine::StateMachineStore;
use super::types::{Member, NodeId, Raft};
use crate::config::Config;
use crate::state::{Batch, BatchResponse};

/// Why a write or a current read could not be served.
#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize)]
pub enum Error {
    #[error("no leader could be reached within {waited_ms} ms")]
    NoLeader { waited_ms: u64 },
    #[error("this node is not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    #[error("raft stopped: {0}")]
    Stopped(String),
    #[error("membership change rejected: {0}")]
    Membership(String),
}

/// Where the peer server hands the batches other nodes forward to this one: the node's
/// proposer, so that on the leader they join its own next entry (one append and one
/// fsync for the writes of every node) instead of each becoming an entry of its own.
pub trait ForwardedWrites: Send + Sync + 'static {
    /// Commit `batch` in this node's next entry; `NotLeader` when this node does not lead.
    fn propose_forwarded(
        &self,
        batch: Batch,
    ) -> futures::future::BoxFuture<'static, Result<BatchResponse, Error>>;
}

/// How long a node being added may take to answer on its peer address.
const NEW_MEMBER_ANSWERS_WITHIN: Duration = Duration::from_secs(5);
/// How long a new node may take to catch up before it is made a voter.
const CATCH_UP_WITHIN: Duration = Duration::from_secs(45);
/// How long an API request that changes the membership may take: the checks, the
/// catch-up and the promotion (other requests end within [`RaftNode::request_bound`]).
pub const MEMBERSHIP_BOUND: Duration = Duration::from_secs(60);
/// How long a node waits for the leader to answer a forwarded membership change.
const MEMBERSHIP_FORWARD_WAIT: Duration = Duration::from_secs(58);

/// A membership change an operator asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum MembershipOp {
    /// Add as learner, wait until it has caught up, then make it a voter.
    Add { node_id: NodeId, member: Member },
    /// Remove from the voters and from the cluster.
    Remove { node_id: NodeId },
}

/// A request for an attempt's log, sent to the node that ran it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogRequest {
    pub run_id: String,
    pub task_id: String,
    pub attempt: u32,
}

/// What a node reports about itself and the cluster.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Status {
    pub node_id: NodeId,
    pub initialized: bool,
    pub state: String,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub committed_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    pub members: BTreeMap<NodeId, Member>,
    /// Leader only: how many entries each member's replication is behind.
    pub replication_lag: BTreeMap<NodeId, Option<u64>>,
    pub log_size_bytes: u64,
    /// Leader only: milliseconds since a quorum last acknowledged it.
    pub millis_since_quorum_ack: Option<u64>,
    /// The newest replicated protocol this node's binary applies (1 for binaries that
    /// predate the field).
    #[serde(default = "protocol_v1")]
    pub protocol_supported: u32,
    /// This node's wall clock when it answered (absent from binaries before it).
    #[serde(default)]
    pub wall_ms: Option<i64>,
    /// How far each voter's clock is ahead of this node's, as this node last measured.
    #[serde(default)]
    pub clock_offsets_ms: BTreeMap<NodeId, i64>,
    /// The disk this node holds ([`super::db::Db::disk_id`]; absent from older binaries).
    #[serde(default)]
    pub disk: Option<String>,
    /// How many milliseconds ago each other member last answered this node over the
    /// peer port: every heartbeat while it leads, every clock sample (voters, every two
    /// seconds) otherwise. A member never heard from since this node started is absent.
    #[serde(default)]
    pub peer_answered_ms_ago: BTreeMap<NodeId, u64>,
}

fn protocol_v1() -> u32 {
    1
}

/// The node's Raft and what it needs to reach its peers. Cheap to clone.
#[derive(Clone)]
pub struct RaftNode {
    pub id: NodeId,
    /// This node's disk ([`super::db::Db::disk_id`]).
    pub disk: String,
    pub raft: Raft,
    pub db: Db,
    pub sm: StateMachineStore,
    pub peers: PeerClients,
    /// The voters' median clock, which every time this node writes comes from.
    pub clock: Arc<ClusterClock>,
    leader_wait: Duration,
    rpc_timeout: Duration,
    config: Arc<Config>,
    metrics_seen: MetricsSeen,
    /// The leader's confirmations of its read index, shared by the reads that wait for
    /// the same round.
    read_rounds: ReadRounds<Result<Option<u64>, Error>>,
    /// A follower's requests for the leader's read index, likewise shared: one peer call
    /// per round answers every barrier that joined it, not one call per read.
    forwarded_rounds: ReadRounds<Result<Option<u64>, Error>>,
}

/// Elections only while this node's own entry in the membership names this disk (or
/// none): a node holding another member's data (a volume cloned or swapped) refuses the
/// cluster's calls, hears no leader, and would otherwise campaign, counting its own vote
/// from another disk's record. Follows the membership, so a node added anew (its entry
/// naming its disk once the add arrives) campaigns again.
fn guard_elections(raft: Raft, id: NodeId, disk: String) {
    tokio::spawn(async move {
        let mut metrics = raft.metrics();
        let mut allowed = true;
        loop {
            let own = metrics
                .borrow_and_update()
                .membership_config
                .membership()
                .get_node(&id)
                .and_then(|m| m.disk.clone());
            let ok = own.as_deref().is_none_or(|d| d == disk);
            if ok != allowed {
                raft.runtime_config().elect(ok);
                if ok {
                    info!(
                        node = id,
                        "this node's disk is its member's again: it may campaign"
                    );
                } else {
                    warn!(node = id, disk = %disk, member_disk = ?own,
                          "this node holds another disk than its member's: it does not campaign \
                           (remove it and add it again; after restoring the cluster from one \
                           archive, run `orchestrator restore-identity` on each node)");
                }
                allowed = ok;
            }
            if metrics.changed().await.is_err() {
                return;
            }
        }
    });
}

/// `orchestrator restore-identity`: run on a stopped node whose data dir was restored
/// from another node's archive (the whole cluster restored from one backup). The node
/// takes the disk identity its own member entry records, so the cluster accepts it.
/// Answers what it did.
pub fn restore_identity(data_dir: &std::path::Path, node: NodeId) -> Result<String, Error> {
    let db = super::db::Db::open(&data_dir.join("db"))
        .map_err(|e| Error::Stopped(format!("cannot open the database: {e}")))?;
    let (_, membership) = StateMachineStore::read_applied(&db)
        .map_err(|e| Error::Stopped(format!("cannot read the membership: {e}")))?;
    let member = membership
        .membership()
        .get_node(&node)
        .cloned()
        .ok_or_else(|| {
            Error::Stopped(format!(
                "node {node} is not a member in this data dir's state: nothing to restore"
            ))
        })?;
    let Some(recorded) = member.disk else {
        return Ok(format!(
            "node {node}'s member entry records no disk (it joined before disks were \
             recorded): nothing to do"
        ));
    };
    let current = db
        .disk_id()
        .map_err(|e| Error::Stopped(format!("cannot read the disk id: {e}")))?;
    if current == recorded {
        return Ok(format!(
            "node {node} already holds its member's disk {recorded}"
        ));
    }
    db.adopt_disk_id(&recorded)
        .map_err(|e| Error::Stopped(format!("cannot write the disk id: {e}")))?;
    Ok(format!(
        "node {node} now holds its member's disk {recorded} (was {current})"
    ))
}

/// One confirmation of leadership with a quorum: the read index a linearizable read may
/// serve from once applied.
async fn confirm_read_index(raft: Raft, leader_wait: Duration) -> Result<Option<u64>, Error> {
    match tokio::time::timeout(leader_wait, raft.get_read_log_id()).await {
        Err(_) => Err(Error::NoLeader {
            waited_ms: leader_wait.as_millis() as u64,
        }),
        Ok(Ok((read, _applied))) => Ok(read.map(|l| l.index)),
        Ok(Err(RaftError::APIError(e))) => Err(Error::NotLeader {
            leader: match e {
                openraft::error::CheckIsLeaderError::ForwardToLeader(f) => f.leader_id,
                openraft::error::CheckIsLeaderError::QuorumNotEnough(_) => None,
            },
        }),
        Ok(Err(RaftError::Fatal(e))) => Err(Error::Stopped(e.to_string())),
    }
}

/// One request (from a follower) for the read index of the leader it knows, which
/// confirms it with a quorum. `NotLeader` when this node knows of no other leader.
async fn leaders_read_index(
    raft: Raft,
    peers: PeerClients,
    id: NodeId,
    leader_wait: Duration,
) -> Result<Option<u64>, Error> {
    let (leader, member) = {
        let m = raft.metrics().borrow().clone();
        let leader = m.current_leader.filter(|l| *l != id);
        let member = leader.and_then(|l| m.membership_config.membership().get_node(&l).cloned());
        (leader, member)
    };
    let (Some(l), Some(member)) = (leader, member) else {
        return Err(Error::NotLeader { leader });
    };
    let answer: Result<Result<Option<u64>, Error>, _> = peers
        .call(
            l,
            &member.peer_addr,
            "/cluster/read-index",
            &(),
            leader_wait,
        )
        .await;
    answer.map_err(|_| Error::NotLeader { leader: Some(l) })?
}

/// When this node last saw openraft publish metrics it can trust. openraft computes
/// `millis_since_quorum_ack` when it publishes, at the top of RaftCore's loop, so a value
/// read later is older by the time since: a leader paused (SIGSTOP) for many election
/// timeouts shows the age from before its pause until RaftCore finishes the batch of
/// messages it was in and publishes again, and called itself a serving leader meanwhile.
/// openraft publishes at least once per tick (a third of a heartbeat with the vendored
/// patch), so for a live node the age grows by at most that. A value seen after a longer
/// silence may have been published before it (the process stalled between publishing and
/// this watcher running): it is not trusted, and the next one, published after the stall,
/// is.
#[derive(Clone)]
struct MetricsSeen(Arc<std::sync::Mutex<Option<Instant>>>);

impl MetricsSeen {
    /// Follow `raft`'s metrics until it shuts down; `stall` is the silence after which a
    /// value is not trusted.
    fn follow(raft: &Raft, stall: Duration) -> MetricsSeen {
        let seen = MetricsSeen(Arc::new(std::sync::Mutex::new(Some(Instant::now()))));
        let mut rx = raft.metrics();
        let mark = seen.clone();
        tokio::spawn(async move {
            let mut prev = Instant::now();
            while rx.changed().await.is_ok() {
                let now = Instant::now();
                let trusted = now.duration_since(prev) < stall;
                prev = now;
                *mark.0.lock().unwrap_or_else(|p| p.into_inner()) = trusted.then_some(now);
            }
        });
        seen
    }

    /// Milliseconds since trusted metrics were published (`u64::MAX` if the last were not).
    fn age_ms(&self) -> u64 {
        let at = *self.0.lock().unwrap_or_else(|p| p.into_inner());
        at.map_or(u64::MAX, |at| at.elapsed().as_millis() as u64)
    }
}

impl RaftNode {
    /// This node's configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Open the stores and start openraft (does not form a cluster; see [`Self::bootstrap`]).
    pub async fn start(
        config: Arc<Config>,
        db: Db,
        secret: &str,
        tls: Option<super::network::PeerTls>,
    ) -> Result<RaftNode, Error> {
        let r = &config.raft;
        let raft_config = openraft::Config {
            cluster_name: "orchestrator".into(),
            heartbeat_interval: r.heartbeat_ms,
            election_timeout_min: r.election_timeout_min_ms,
            election_timeout_max: r.election_timeout_max_ms,
            install_snapshot_timeout: r.install_snapshot_timeout_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(r.snapshot_after_logs),
            max_in_snapshot_log_to_keep: r.logs_kept_after_snapshot,
            snapshot_max_chunk_size: r.snapshot_chunk_bytes,
            ..Default::default()
        }
        .validate()
        .map_err(|e| Error::Stopped(format!("raft config: {e}")))?;
        let peers = PeerClients::new(
            config.node_id,
            secret,
            Duration::from_millis(r.rpc_connect_timeout_ms),
            tls,
            config
                .peer_addr
                .parse::<std::net::SocketAddr>()
                .ok()
                .map(|a| a.ip()),
        );
        let disk = db
            .disk_id()
            .map_err(|e| Error::Stopped(format!("disk id: {e}")))?;
        let sm = StateMachineStore::new(db.clone())
            .map_err(|e| Error::Stopped(format!("state machine: {e}")))?;
        let raft = Raft::new(
            config.node_id,
            Arc::new(raft_config),
            NetworkFactory {
                clients: peers.clone(),
            },
            LogStore::new(db.clone()),
            sm.clone(),
        )
        .await
        .map_err(|e| Error::Stopped(e.to_string()))?;
        guard_elections(raft.clone(), config.node_id, disk.clone());
        let metrics_seen =
            MetricsSeen::follow(&raft, Duration::from_millis(r.election_timeout_min_ms));
        let leader_wait = config.leader_wait();
        let read_rounds = {
            let raft = raft.clone();
            ReadRounds::new(move || confirm_read_index(raft.clone(), leader_wait))
        };
        let forwarded_rounds = {
            let (raft, peers, id) = (raft.clone(), peers.clone(), config.node_id);
            ReadRounds::new(move || {
                leaders_read_index(raft.clone(), peers.clone(), id, leader_wait)
            })
        };
        Ok(RaftNode {
            id: config.node_id,
            disk,
            metrics_seen,
            read_rounds,
            forwarded_rounds,
            raft,
            db,
            sm,
            peers,
            clock: Arc::new(ClusterClock::new(config.node_id, r.max_clock_offset_ms)),
            leader_wait,
            rpc_timeout: Duration::from_millis(r.election_timeout_min_ms.max(1000)),
            config,
        })
    }

    pub fn self_member(&self) -> Member {
        Member {
            api_addr: self.config.api_addr.clone(),
            peer_addr: self.config.peer_addr.clone(),
            disk: Some(self.disk.clone()),
        }
    }

    /// Form the cluster if this is the bootstrap node and nobody has formed one yet.
    ///
    /// A bootstrap node whose disk was wiped must not start a second cluster: it only
    /// initializes when every configured peer answers and reports itself uninitialized.
    /// Runs until the cluster exists (formed here or found elsewhere) or `stop` fires.
    pub async fn bootstrap(&self, stop: tokio::sync::watch::Receiver<bool>) {
        if !self.config.is_bootstrap() {
            return;
        }
        loop {
            if *stop.borrow() {
                return;
            }
            match self.raft.is_initialized().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => {
                    warn!(error = %e, "raft stopped before bootstrap");
                    return;
                }
            }
            let mut all_fresh = true;
            let mut disks = BTreeMap::new();
            for p in &self.config.peers {
                let res: Result<Status, _> = self
                    .peers
                    .call(p.id, &p.peer_addr, "/cluster/status", &(), self.rpc_timeout)
                    .await;
                match res {
                    Ok(s) if s.initialized => {
                        warn!(
                            node = self.id,
                            peer = p.id,
                            "peer already belongs to a cluster; not initializing a new one \
                             (an operator re-adds this node through the admin API)"
                        );
                        return;
                    }
                    Ok(s) => {
                        disks.insert(p.id, s.disk);
                    }
                    Err(e) => {
                        info!(node = self.id, peer = p.id, error = %e, "waiting for peer before forming the cluster");
                        all_fresh = false;
                    }
                }
            }
            if all_fresh {
                let mut members = BTreeMap::new();
                members.insert(self.id, self.self_member());
                for p in &self.config.peers {
                    members.insert(
                        p.id,
                        Member {
                            api_addr: p.api_addr.clone(),
                            peer_addr: p.peer_addr.clone(),
                            disk: disks.remove(&p.id).flatten(),
                        },
                    );
                }
                match self.raft.initialize(members).await {
                    Ok(()) => info!(node = self.id, "cluster initialized"),
                    Err(e) => warn!(node = self.id, error = %e, "initialize refused"),
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn leader_member(&self, id: NodeId) -> Option<Member> {
        let m = self.raft.metrics().borrow().clone();
        m.membership_config.membership().get_node(&id).cloned()
    }

    /// Commit `batch` (on the leader, or forwarded to it once), retrying with the same
    /// request ids until `deadline`. `forwarded` marks a batch that already took its one
    /// hop: it is never forwarded again. `let_go_in` is the term in which this node, as
    /// leader, let the batch go (its proposer holds writes at a term's start, see
    /// `actors::proposer`): a batch that finds this node leading in another term is handed
    /// back (`NotLeader` naming this node) rather than written past that hold.
    pub async fn propose_by(
        &self,
        batch: &Batch,
        forwarded: bool,
        let_go_in: Option<u64>,
        deadline: Instant,
    ) -> Result<BatchResponse, Error> {
        let no_leader = || Error::NoLeader {
            waited_ms: self.leader_wait.as_millis() as u64,
        };
        let mut pause = Duration::from_millis(20);
        loop {
            let mut metrics = self.raft.metrics();
            let m = metrics.borrow_and_update().clone();
            let leader_hint = if m.state == ServerState::Leader && !self.has_quorum(&m) {
                // openraft 0.9 never steps down a leader that lost its quorum, and its
                // client_write would wait for a commit that cannot come: do not propose,
                // wait for the quorum (or a new leader) until the deadline.
                None
            } else if m.state != ServerState::Leader {
                // Not the leader (as last seen): forward, never `client_write` here. This
                // node may win an election between that look and the call, and the write
                // would then be its term's first entry, past the hold for the term's first
                // protocol raise (seen under load: a fresh cluster's first write applied
                // under version 1's rules).
                m.current_leader
            } else if let_go_in != Some(m.current_term) {
                return Err(Error::NotLeader {
                    leader: Some(self.id),
                });
            } else {
                let write = self.raft.client_write(self.stamped(batch));
                let proposed = Instant::now();
                match tokio::time::timeout(self.remaining(deadline), write).await {
                    // The entry may still commit later; its request ids make a retry safe.
                    Err(_elapsed) => return Err(no_leader()),
                    Ok(Ok(resp)) => {
                        // client_write answers once the entry is applied here, the leader.
                        metrics::histogram!(crate::telemetry::metrics::RAFT_COMMIT_SECONDS)
                            .record(proposed.elapsed().as_secs_f64());
                        return Ok(resp.data);
                    }
                    Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                        f.leader_id
                    }
                    Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
                        return Err(Error::Membership(e.to_string()))
                    }
                    Ok(Err(RaftError::Fatal(e))) => return Err(Error::Stopped(e.to_string())),
                }
            };
            if forwarded {
                return Err(Error::NotLeader {
                    leader: leader_hint,
                });
            }
            if let Some(leader) = leader_hint.filter(|l| *l != self.id) {
                if let Some(member) = self.leader_member(leader) {
                    let res: Result<Result<BatchResponse, Error>, _> = self
                        .peers
                        .call(
                            leader,
                            &member.peer_addr,
                            "/cluster/propose",
                            batch,
                            self.remaining(deadline),
                        )
                        .await;
                    match res {
                        Ok(Ok(resp)) => return Ok(resp),
                        Ok(Err(e)) => {
                            info!(node = self.id, leader, error = %e, "forwarded write not accepted; retrying")
                        }
                        Err(e) => {
                            info!(node = self.id, leader, error = %e, "forwarding failed; retrying")
                        }
                    }
                }
            }
            if Instant::now() + pause >= deadline {
                return Err(no_leader());
            }
            // Retry after the pause, or as soon as openraft names another leader or this
            // node changes role: after a failover that is the moment the write can go.
            let _ = tokio::time::timeout(
                pause,
                metrics.wait_for(|n| n.current_leader != m.current_leader || n.state != m.state),
            )
            .await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// The batch as this node proposes it: every request stamped with the cluster's clock
    /// as this node reads it now ([`ClusterClock`]), on every try (a retried batch never
    /// carries a stale stamp). Only the node that calls `client_write` stamps, and apply
    /// keeps the cluster clock monotone.
    fn stamped(&self, batch: &Batch) -> Batch {
        let now = self.clock.now_ms();
        let mut b = batch.clone();
        for r in &mut b.requests {
            r.proposed_at_ms = now;
        }
        b
    }

    /// A leader holds its quorum while a quorum acknowledged it within its lease,
    /// `election_timeout_max` (a single voter always does): openraft 0.9's followers refuse
    /// every other candidate for that long after they last heard from this leader, so no
    /// successor can exist before it (the voters share their Raft timing). Past that,
    /// followers may already be electing a successor: it must stop acting as leader until
    /// a quorum answers again.
    pub fn has_quorum(&self, m: &super::types::RaftMetrics) -> bool {
        self.quorum_acked_within_lease(m.millis_since_quorum_ack)
    }

    /// [`Self::has_quorum`] for a [`Status`]'s `millis_since_quorum_ack`, counted from
    /// when openraft computed it ([`MetricsSeen`]), not from when it is read.
    pub fn quorum_acked_within_lease(&self, millis_since_quorum_ack: Option<u64>) -> bool {
        millis_since_quorum_ack.is_some_and(|ms| {
            ms.saturating_add(self.metrics_seen.age_ms()) < self.config.raft.election_timeout_max_ms
        })
    }

    /// The longest any API request may take: a handler waits at most one read barrier
    /// and one proposal (each bounded by `leader_wait`), plus a second for the rest. The
    /// request-timeout layer answers 503 past it, as a backstop.
    pub fn request_bound(&self) -> Duration {
        self.leader_wait * 2 + Duration::from_secs(1)
    }

    /// How long a request may wait for Raft (`leader_wait_ms`).
    pub fn leader_wait(&self) -> Duration {
        self.leader_wait
    }

    fn remaining(&self, deadline: Instant) -> Duration {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100))
    }

    /// The leader's read index (leader only): confirms leadership with a quorum, in a
    /// round shared with the reads that arrived with this one ([`ReadRounds`]).
    pub async fn read_index(&self) -> Result<Option<u64>, Error> {
        match tokio::time::timeout(self.leader_wait, self.read_rounds.join()).await {
            Ok(Some(answer)) => answer,
            Ok(None) => Err(Error::Stopped("the read-index driver stopped".into())),
            Err(_) => Err(Error::NoLeader {
                waited_ms: self.leader_wait.as_millis() as u64,
            }),
        }
    }

    /// Wait until this node's state is at least as new as the leader's committed state at
    /// the time of the call: afterwards a local read is linearizable.
    pub async fn linearizable_barrier(&self) -> Result<(), Error> {
        let deadline = Instant::now() + self.leader_wait;
        loop {
            let attempt = async {
                let index = match self.read_index().await {
                    Ok(i) => i,
                    // A round that starts after this call asks the leader: its index is
                    // at least the commit index when this read began.
                    Err(Error::NotLeader { leader: Some(l) }) if l != self.id => {
                        match tokio::time::timeout(
                            self.remaining(deadline),
                            self.forwarded_rounds.join(),
                        )
                        .await
                        {
                            Ok(Some(answer)) => answer?,
                            Ok(None) => {
                                return Err(Error::Stopped(
                                    "the forwarded read-index driver stopped".into(),
                                ))
                            }
                            Err(_) => return Err(Error::NotLeader { leader: Some(l) }),
                        }
                    }
                    Err(e) => return Err(e),
                };
                if let Some(index) = index {
                    self.raft
                        .wait(Some(self.remaining(deadline)))
                        .applied_index_at_least(Some(index), "linearizable read")
                        .await
                        .map_err(|e| Error::Stopped(e.to_string()))?;
                }
                Ok(())
            };
            match attempt.await {
                Ok(()) => return Ok(()),
                Err(e @ Error::Stopped(_)) => return Err(e),
                Err(_) if Instant::now() + Duration::from_millis(50) < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(_) => {
                    return Err(Error::NoLeader {
                        waited_ms: self.leader_wait.as_millis() as u64,
                    })
                }
            }
        }
    }

    /// Apply a membership change (leader only; callers forward to the leader). It runs as
    /// a task of its own: a caller that gives up (a dropped request) does not stop it
    /// half-way, with a learner added and neither promoted nor removed.
    pub async fn change_membership(&self, op: MembershipOp) -> Result<Status, Error> {
        let m = self.raft.metrics().borrow().clone();
        if m.current_leader != Some(self.id) {
            // Checked here first so that only the leader probes a new node.
            return Err(Error::NotLeader {
                leader: m.current_leader,
            });
        }
        let this = self.clone();
        tokio::spawn(async move { this.change_membership_here(op).await })
            .await
            .map_err(|e| Error::Stopped(format!("the membership change failed: {e}")))?
    }

    async fn change_membership_here(&self, op: MembershipOp) -> Result<Status, Error> {
        let to_err = |e: String| Error::Membership(e);
        let not_leader = |e: &RaftError<NodeId, ClientWriteError<NodeId, Member>>| match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => Some(Error::NotLeader {
                leader: f.leader_id,
            }),
            _ => None,
        };
        match op {
            MembershipOp::Add { node_id, member } => {
                let m = self.raft.metrics().borrow().clone();
                let membership = m.membership_config.membership();
                let member = if let Some(existing) = membership.get_node(&node_id) {
                    if (&existing.api_addr, &existing.peer_addr)
                        != (&member.api_addr, &member.peer_addr)
                    {
                        return Err(to_err(format!(
                            "node {node_id} is already a member ({existing}); remove it before \
                             adding it at other addresses"
                        )));
                    }
                    if membership.voter_ids().any(|v| v == node_id) {
                        // A retried add: it is done.
                        return Ok(self.status().await);
                    }
                    existing.clone()
                } else {
                    let disk = self
                        .check_new_member(node_id, &member)
                        .await
                        .map_err(to_err)?;
                    Member { disk, ..member }
                };
                // Not openraft's blocking add: it gives up after a moment and returns Ok
                // either way (near the log's start), or waits with no bound (far from it).
                let added = match self.raft.add_learner(node_id, member.clone(), false).await {
                    Ok(r) => r.log_id.index,
                    Err(e) => return Err(not_leader(&e).unwrap_or_else(|| to_err(e.to_string()))),
                };
                // A voter that has not caught up would cost the quorum.
                if let Err(e) = self.wait_caught_up(node_id, added).await {
                    let mut rm = std::collections::BTreeSet::new();
                    rm.insert(node_id);
                    let undone = self
                        .raft
                        .change_membership(ChangeMembers::RemoveNodes(rm), false)
                        .await;
                    return Err(match (e, undone) {
                        (Error::Membership(why), Ok(_)) => {
                            to_err(format!("{why}; it was not added (it stays a non-member)"))
                        }
                        (Error::Membership(why), Err(undo)) => to_err(format!(
                            "{why}; it stays a learner (not a voter) because removing it failed: \
                             {undo}; remove it with DELETE /cluster/members/{node_id}"
                        )),
                        (other, _) => other,
                    });
                }
                let mut add = std::collections::BTreeSet::new();
                add.insert(node_id);
                if let Err(e) = self
                    .raft
                    .change_membership(ChangeMembers::AddVoterIds(add), false)
                    .await
                {
                    return Err(not_leader(&e).unwrap_or_else(|| to_err(e.to_string())));
                }
            }
            MembershipOp::Remove { node_id } => {
                let m = self.raft.metrics().borrow().clone();
                if m.membership_config
                    .membership()
                    .get_node(&node_id)
                    .is_none()
                {
                    return Err(to_err(format!("node {node_id} is not a member")));
                }
                let mut rm = std::collections::BTreeSet::new();
                rm.insert(node_id);
                let voter = m
                    .membership_config
                    .membership()
                    .voter_ids()
                    .any(|v| v == node_id);
                // Not retained as a learner: a voter leaves the membership in this step.
                if voter {
                    if let Err(e) = self
                        .raft
                        .change_membership(ChangeMembers::RemoveVoters(rm.clone()), false)
                        .await
                    {
                        return Err(not_leader(&e).unwrap_or_else(|| to_err(e.to_string())));
                    }
                    if node_id == self.id {
                        // The leader removed itself and has stepped down: only a leader
                        // may change the membership (openraft asserts it), and there is
                        // nothing left to change.
                        return Ok(self.status().await);
                    }
                }
                if let Err(e) = self
                    .raft
                    .change_membership(ChangeMembers::RemoveNodes(rm), false)
                    .await
                {
                    return Err(not_leader(&e).unwrap_or_else(|| to_err(e.to_string())));
                }
            }
        }
        Ok(self.status().await)
    }

    /// Before a node joins: it answers on its peer address as `node_id`, proves it holds
    /// the cluster secret without being sent it ([`super::hello`]), advertises that
    /// address, belongs to no cluster yet, and its binary applies the cluster's protocol.
    /// A typo in an address or an unstarted node is refused here instead of becoming a
    /// voter the quorum needs, and whoever listens at a wrong address learns nothing.
    /// Answers the disk the node holds (None from a binary that predates it).
    async fn check_new_member(
        &self,
        node_id: NodeId,
        member: &Member,
    ) -> Result<Option<String>, String> {
        let at = &member.peer_addr;
        let nonce = super::hello::nonce();
        let probe = super::hello::HelloRequest {
            nonce: nonce.clone(),
        };
        // A node started a moment ago may not listen yet: it gets a few seconds.
        let until = Instant::now() + NEW_MEMBER_ANSWERS_WITHIN;
        let s: super::hello::Hello = loop {
            // Every call ends by `until`: the node answers within the bound, all calls told.
            let left = until
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(100), self.rpc_timeout);
            match self
                .peers
                .call_without_secret(node_id, at, "/cluster/hello", &probe, left)
                .await
            {
                Ok(s) => break s,
                Err(super::network::PeerError::Unreachable { .. }) if Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(super::network::PeerError::Refused { message, .. }) => {
                    return Err(format!(
                        "the node at {at} answers but refused the call ({message}): it is \
                         not node {node_id}"
                    ))
                }
                Err(super::network::PeerError::NoRoute { .. }) => {
                    return Err(format!(
                        "the node at {at} does not serve the join probe: it is not an \
                         orchestrator node, or its binary is older than the cluster's"
                    ))
                }
                Err(e) => {
                    return Err(format!(
                        "node {node_id} does not answer at {at} (is it running, with node_id \
                         {node_id} and this cluster's secret?): {e}"
                    ))
                }
            }
        };
        if s.node_id != node_id {
            return Err(format!(
                "the node at {at} is node {}, not {node_id}",
                s.node_id
            ));
        }
        // A member proves nothing (it cannot join another cluster): refused either way.
        if s.initialized {
            return Err(format!(
                "node {node_id} at {at} already belongs to a cluster (a removed node must have \
                 its data dir wiped before it is added again)"
            ));
        }
        if !super::hello::verify(self.peers.secret(), &nonce, &s) {
            return Err(format!(
                "the node at {at} cannot prove it holds this cluster's secret: it runs with \
                 another one, or it is not an orchestrator node"
            ));
        }
        if !super::hello::same_address(&s.peer_addr, at) {
            return Err(format!(
                "node {node_id} advertises peer address {} (its peer_addr setting), not {at}: \
                 add it with the address it advertises (which must be one address, not \
                 0.0.0.0 or ::)",
                s.peer_addr
            ));
        }
        let protocol = self
            .applied_protocol()
            .map_err(|e| format!("cannot read the cluster's protocol: {e}"))?;
        if s.protocol_supported < protocol {
            return Err(format!(
                "node {node_id} offers protocol {} (its binary's newest, or its \
                 raft.max_protocol), the cluster is at {protocol}: upgrade it or raise its \
                 raft.max_protocol first",
                s.protocol_supported
            ));
        }
        Ok(s.disk)
    }

    /// Wait until the leader has replicated to learner `node` up to log `index`, for at
    /// most [`CATCH_UP_WITHIN`]; fails at once if this node stops leading.
    async fn wait_caught_up(&self, node: NodeId, index: u64) -> Result<(), Error> {
        let deadline = Instant::now() + CATCH_UP_WITHIN;
        let mut metrics = self.raft.metrics();
        loop {
            let (replication, leader) = {
                let m = metrics.borrow_and_update();
                (m.replication.clone(), m.current_leader)
            };
            let Some(replication) = replication else {
                return Err(Error::NotLeader { leader });
            };
            let matched = replication.get(&node).cloned().flatten().map(|l| l.index);
            if matched.is_some_and(|m| m >= index) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Membership(format!(
                    "node {node} did not catch up within {} s (replicated up to {} of {index})",
                    CATCH_UP_WITHIN.as_secs(),
                    matched.map_or("nothing".to_string(), |m| m.to_string())
                )));
            }
            if let Ok(Err(e)) = tokio::time::timeout(left, metrics.changed()).await {
                return Err(Error::Stopped(e.to_string()));
            }
        }
    }

    /// Run a membership change on the leader, forwarding if this node is not it.
    pub async fn change_membership_anywhere(&self, op: MembershipOp) -> Result<Status, Error> {
        match self.change_membership(op.clone()).await {
            Err(Error::NotLeader { leader: Some(l) }) if l != self.id => {
                let member = self
                    .leader_member(l)
                    .ok_or(Error::NotLeader { leader: Some(l) })?;
                let res: Result<Result<Status, Error>, _> = self
                    .peers
                    .call(
                        l,
                        &member.peer_addr,
                        "/cluster/membership",
                        &op,
                        MEMBERSHIP_FORWARD_WAIT,
                    )
                    .await;
                res.map_err(|_| Error::NoLeader {
                    waited_ms: self.leader_wait.as_millis() as u64,
                })?
            }
            other => other,
        }
    }

    /// The output of an attempt that ran on `node` (read here, or asked of that node).
    pub async fn attempt_log(
        &self,
        node: NodeId,
        run_id: &str,
        task_id: &str,
        attempt: u32,
    ) -> Result<Option<String>, super::network::PeerError> {
        if node == self.id {
            return Ok(self.local_attempt_log(run_id, task_id, attempt));
        }
        let member =
            self.leader_member(node)
                .ok_or_else(|| super::network::PeerError::Unreachable {
                    target: node,
                    message: "not a member any more".into(),
                })?;
        let req = LogRequest {
            run_id: run_id.into(),
            task_id: task_id.into(),
            attempt,
        };
        self.peers
            .call(
                node,
                &member.peer_addr,
                "/cluster/log",
                &req,
                Duration::from_secs(10),
            )
            .await
    }

    /// Read an attempt's log from this node's disk.
    pub fn local_attempt_log(&self, run_id: &str, task_id: &str, attempt: u32) -> Option<String> {
        // Ids are validated ([A-Za-z0-9_.-]); still refuse anything path-like.
        if [run_id, task_id]
            .iter()
            .any(|s| s.contains('/') || s.contains("..") || s.is_empty())
        {
            return None;
        }
        let path = crate::executor::log_path(&self.config.data_dir, run_id, task_id, attempt);
        std::fs::read(path)
            .ok()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    }

    /// This node's view of itself and the cluster.
    pub async fn status(&self) -> Status {
        let initialized = self.raft.is_initialized().await.unwrap_or(false);
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let learners: Vec<NodeId> = membership.learner_ids().collect();
        let members: BTreeMap<NodeId, Member> =
            membership.nodes().map(|(id, n)| (*id, n.clone())).collect();
        let last_log = m.last_log_index;
        let replication_lag = m
            .replication
            .as_ref()
            .map(|r| {
                r.iter()
                    .map(|(id, matched)| {
                        let lag = match (last_log, matched) {
                            (Some(l), Some(mi)) => Some(l.saturating_sub(mi.index)),
                            (Some(l), None) => Some(l),
                            _ => None,
                        };
                        (*id, lag)
                    })
                    .collect()
            })
            .unwrap_or_default();
        Status {
            node_id: self.id,
            initialized,
            state: match m.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "shutdown",
            }
            .to_string(),
            leader: m.current_leader,
            term: m.current_term,
            last_log_index: m.last_log_index,
            committed_index: self.committed_index(),
            applied_index: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            voters,
            learners,
            members,
            replication_lag,
            log_size_bytes: self.db.log_size_bytes(),
            millis_since_quorum_ack: m.millis_since_quorum_ack,
            protocol_supported: self.protocol_offered(),
            wall_ms: Some(super::clock::wall_ms()),
            clock_offsets_ms: self.clock.offsets_ms(),
            disk: Some(self.disk.clone()),
            peer_answered_ms_ago: self
                .peers
                .answered_ms_ago()
                .into_iter()
                .filter(|(id, _)| m.membership_config.membership().get_node(id).is_some())
                .collect(),
        }
    }

    fn committed_index(&self) -> Option<u64> {
        self.db
            .get_json::<Option<super::types::LogId>>(super::db::CF_RAFT_META, b"committed")
            .ok()
            .flatten()
            .flatten()
            .map(|l| l.index)
    }

    /// True when this node is the leader, has applied an entry of its own term and holds
    /// its quorum: the gate for leader-only work (scheduling, supervision).
    /// The current voters.
    pub fn voter_ids(&self) -> Vec<NodeId> {
        let m = self.raft.metrics().borrow().clone();
        let voters = m.membership_config.membership().voter_ids().collect();
        voters
    }

    /// True when this node reads the cluster clock from a majority of voters' clocks
    /// (see [`ClusterClock::calibrated`]).
    pub fn clock_calibrated(&self) -> bool {
        self.clock.calibrated(&self.voter_ids())
    }

    /// Sample every other voter's clock every [`clock::SAMPLE_EVERY`] (more often while
    /// not calibrated) until `stop`.
    pub async fn sample_clocks(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            let m = self.raft.metrics().borrow().clone();
            let membership = m.membership_config.membership().clone();
            let voters: Vec<NodeId> = membership.voter_ids().collect();
            self.clock.retain(&voters);
            let rounds = voters
                .iter()
                .filter(|id| **id != self.id)
                .filter_map(|id| membership.get_node(id).map(|m| (*id, m.peer_addr.clone())))
                .map(|(id, addr)| async move {
                    let (sent_wall, sent) = (clock::wall_ms(), Instant::now());
                    let res: Result<clock::ClockReading, _> = self
                        .peers
                        .call(id, &addr, "/cluster/clock", &(), clock::SAMPLE_EVERY)
                        .await;
                    match res {
                        Ok(r) => self.clock.record(id, sent_wall, sent.elapsed(), r.wall_ms),
                        // A peer on an older binary: its status carries its clock.
                        Err(super::network::PeerError::NoRoute { .. }) => {
                            let (sent_wall, sent) = (clock::wall_ms(), Instant::now());
                            let res: Result<Status, _> = self
                                .peers
                                .call(id, &addr, "/cluster/status", &(), clock::SAMPLE_EVERY)
                                .await;
                            if let Ok(Status {
                                wall_ms: Some(peer_wall),
                                ..
                            }) = res
                            {
                                self.clock.record(id, sent_wall, sent.elapsed(), peer_wall);
                            }
                        }
                        Err(_) => {}
                    }
                });
            futures::future::join_all(rounds).await;
            // Until calibrated, the scheduler and the executor wait: sample sooner.
            let next = if self.clock.calibrated(&voters) {
                clock::SAMPLE_EVERY
            } else {
                clock::SAMPLE_EVERY_UNCALIBRATED
            };
            tokio::select! {
                _ = tokio::time::sleep(next) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// The replicated protocol version as applied on this node (1 when never raised).
    pub fn applied_protocol(&self) -> Result<u32, String> {
        use crate::state::machine::{clock, Table};
        let v = self
            .db
            .get(Table::Counters.name(), clock::PROTOCOL)
            .map_err(|e| e.to_string())?;
        Ok(v.and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map_or(1, |b| u64::from_be_bytes(b) as u32))
    }

    /// The newest protocol this node lets the cluster raise to: its binary's, or older
    /// when `raft.max_protocol` holds it back.
    pub fn protocol_offered(&self) -> u32 {
        let newest = crate::state::machine::PROTOCOL_VERSION;
        self.config
            .raft
            .max_protocol
            .map_or(newest, |p| p.min(newest))
    }

    /// The newest protocol every voter supports (asked of all at once; an unreachable
    /// voter counts as version 1, so a raise waits for it).
    pub async fn voters_support(&self) -> u32 {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership().clone();
        let asked = membership
            .voter_ids()
            .filter(|id| *id != self.id)
            .map(|id| {
                let member = membership.get_node(&id).cloned();
                async move {
                    let member = member?;
                    let res: Result<Status, _> = self
                        .peers
                        .call(
                            id,
                            &member.peer_addr,
                            "/cluster/status",
                            &(),
                            self.rpc_timeout,
                        )
                        .await;
                    res.ok().map(|s| s.protocol_supported)
                }
            });
        futures::future::join_all(asked)
            .await
            .into_iter()
            .try_fold(self.protocol_offered(), |min, v| v.map(|v| min.min(v)))
            .unwrap_or(1)
    }

    pub fn is_serving_leader(&self, m: &super::types::RaftMetrics) -> bool {
        m.state == ServerState::Leader
            && m.current_leader == Some(m.id)
            && m.last_applied.map(|l| l.leader_id.term) == Some(m.current_term)
            && self.has_quorum(m)
    }
}

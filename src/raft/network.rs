//! Peer RPC client: openraft's network over HTTP to the peers' peer address.
//! One pooled `reqwest::Client` per peer; every call carries the cluster secret (but the
//! join probe, [`super::hello`]) and the target's node id and is bounded by openraft's RPC timeout. Connection failures are
//! reported as `Unreachable` so openraft backs off instead of hammering a dead peer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::types::{Member, NodeId, TypeConfig};

pub const HEADER_SECRET: &str = "x-cluster-secret";
pub const HEADER_TARGET: &str = "x-target-node";
pub const HEADER_SOURCE: &str = "x-source-node";
/// On Raft calls: the disk the caller knows the target by ([`super::types::Member::disk`]).
pub const HEADER_TARGET_DISK: &str = "x-target-disk";

/// Errors of a peer call made by the node itself (forwarding, read index, admin).
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer {target} unreachable: {message}")]
    Unreachable { target: NodeId, message: String },
    #[error("peer {target} call failed: {message}")]
    Failed { target: NodeId, message: String },
    /// The peer does not serve the path (a node on an older binary).
    #[error("peer {target} does not serve {path}")]
    NoRoute { target: NodeId, path: String },
    /// The peer answered and refused the caller: another node id is there (421), or it
    /// runs with another cluster secret or CA (401, 403).
    #[error("peer {target} refused the call: {message}")]
    Refused { target: NodeId, message: String },
}

/// How a node calls its peers over TLS: the CA it trusts them through, and the
/// certificate (with its key) it presents as a client — peers require it (mutual TLS).
#[derive(Clone)]
pub struct PeerTls {
    pub ca: reqwest::Certificate,
    pub identity: reqwest::Identity,
}

/// Pooled HTTP clients to every peer, shared by Raft replication and node-to-node calls.
#[derive(Clone)]
pub struct PeerClients {
    node_id: NodeId,
    secret: Arc<str>,
    connect_timeout: Duration,
    clients: Arc<Mutex<HashMap<NodeId, reqwest::Client>>>,
    /// When set, peers are called over https trusting only its CA, presenting its
    /// client certificate.
    tls: Option<PeerTls>,
    /// Outgoing peer connections leave from this address (the node's peer address),
    /// so a partition can be drawn between specific nodes.
    local_ip: Option<std::net::IpAddr>,
    /// When each peer last answered a call with success.
    answered: Arc<Mutex<HashMap<NodeId, std::time::Instant>>>,
}

impl PeerClients {
    pub fn new(
        node_id: NodeId,
        secret: &str,
        connect_timeout: Duration,
        tls: Option<PeerTls>,
        local_ip: Option<std::net::IpAddr>,
    ) -> Self {
        PeerClients {
            node_id,
            secret: secret.into(),
            connect_timeout,
            clients: Arc::new(Mutex::new(HashMap::new())),
            tls,
            local_ip: local_ip.filter(|ip| !ip.is_unspecified()),
            answered: Arc::default(),
        }
    }

    /// How many milliseconds ago each peer last answered one of this node's calls with
    /// success (Raft calls while it leads, clock samples of the voters every
    /// [`super::clock::SAMPLE_EVERY`] always). A peer never heard from is absent.
    pub fn answered_ms_ago(&self) -> std::collections::BTreeMap<NodeId, u64> {
        let answered = self
            .answered
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        answered
            .iter()
            .map(|(id, at)| {
                let ms = u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX);
                (*id, ms)
            })
            .collect()
    }

    fn client(&self, target: NodeId) -> reqwest::Client {
        let mut map = self
            .clients
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        map.entry(target)
            .or_insert_with(|| {
                let mut b = reqwest::Client::builder()
                    .connect_timeout(self.connect_timeout)
                    .pool_max_idle_per_host(8)
                    .tcp_nodelay(true)
                    .local_address(self.local_ip);
                if let Some(tls) = &self.tls {
                    b = b
                        .tls_built_in_root_certs(false)
                        .add_root_certificate(tls.ca.clone())
                        .identity(tls.identity.clone());
                }
                b.build().unwrap_or_else(|e| {
                    panic!("an HTTP client with a parsed CA and identity always builds: {e}")
                })
            })
            .clone()
    }

    /// The cluster secret (to check a join probe's proof with, never to send).
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// POST `body` as JSON to `path` on the peer and decode the JSON answer.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        target: NodeId,
        peer_addr: &str,
        path: &str,
        body: &Req,
        timeout: Duration,
    ) -> Result<Resp, PeerError> {
        self.post(target, peer_addr, None, path, body, timeout, true)
            .await
    }

    /// As [`Self::call`], but without the cluster secret: for a node not yet known to be
    /// a member ([`super::hello`]).
    pub async fn call_without_secret<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        target: NodeId,
        peer_addr: &str,
        path: &str,
        body: &Req,
        timeout: Duration,
    ) -> Result<Resp, PeerError> {
        self.post(target, peer_addr, None, path, body, timeout, false)
            .await
    }

    /// One peer call; `disk` (Raft calls) names the disk the target is known by, and a
    /// node that holds another refuses.
    #[allow(clippy::too_many_arguments)]
    async fn post<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        target: NodeId,
        peer_addr: &str,
        disk: Option<&str>,
        path: &str,
        body: &Req,
        timeout: Duration,
        with_secret: bool,
    ) -> Result<Resp, PeerError> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{peer_addr}{path}");
        let mut req = self.client(target).post(&url);
        if with_secret {
            req = req.header(HEADER_SECRET, &*self.secret);
        }
        if let Some(disk) = disk {
            req = req.header(HEADER_TARGET_DISK, disk);
        }
        let resp = req
            .header(HEADER_TARGET, target.to_string())
            .header(HEADER_SOURCE, self.node_id.to_string())
            .timeout(timeout)
            .json(body)
            .send()
            .await
            .map_err(|e| {
                // reqwest's message hides the cause (refused, TLS, timeout): add the chain.
                let mut message = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    message.push_str(": ");
                    message.push_str(&s.to_string());
                    source = s.source();
                }
                if e.is_connect() {
                    PeerError::Unreachable { target, message }
                } else {
                    PeerError::Failed { target, message }
                }
            })?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(PeerError::NoRoute {
                target,
                path: path.to_string(),
            });
        }
        if matches!(
            status,
            reqwest::StatusCode::MISDIRECTED_REQUEST
                | reqwest::StatusCode::UNAUTHORIZED
                | reqwest::StatusCode::FORBIDDEN
                | reqwest::StatusCode::CONFLICT
        ) {
            let text = resp.text().await.unwrap_or_default();
            return Err(PeerError::Refused {
                target,
                message: format!("{status}: {text}"),
            });
        }
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(PeerError::Failed {
                target,
                message: format!("{status}: {text}"),
            });
        }
        let answer = resp.json().await.map_err(|e| PeerError::Failed {
            target,
            message: format!("bad response body: {e}"),
        })?;
        self.answered
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(target, std::time::Instant::now());
        Ok(answer)
    }
}

/// Creates a [`PeerNetwork`] per replication target.
#[derive(Clone)]
pub struct NetworkFactory {
    pub clients: PeerClients,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> PeerNetwork {
        PeerNetwork {
            target,
            peer_addr: node.peer_addr.clone(),
            disk: node.disk.clone(),
            clients: self.clients.clone(),
        }
    }
}

/// The connection to one peer.
pub struct PeerNetwork {
    target: NodeId,
    peer_addr: String,
    /// The disk the membership knows the target by.
    disk: Option<String>,
    clients: PeerClients,
}

impl PeerNetwork {
    async fn rpc<Req, Resp, E>(
        &self,
        path: &str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, Member, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let res: Result<Result<Resp, RaftError<NodeId, E>>, PeerError> = self
            .clients
            .post(
                self.target,
                &self.peer_addr,
                self.disk.as_deref(),
                path,
                req,
                option.hard_ttl(),
                true,
            )
            .await;
        match res {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            // A peer that refuses the call (another disk, another node, a wrong secret)
            // will refuse the next one too: as unreachable, openraft backs off instead
            // of resending at once in a loop (it backs off for `Unreachable` only).
            Err(e @ (PeerError::Unreachable { .. } | PeerError::Refused { .. })) => {
                Err(RPCError::Unreachable(Unreachable::new(&e)))
            }
            Err(e @ (PeerError::Failed { .. } | PeerError::NoRoute { .. })) => {
                Err(RPCError::Network(NetworkError::new(&e)))
            }
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.rpc("/raft/append", &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.rpc("/raft/snapshot", &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.rpc("/raft/vote", &rpc, &option).await
    }
}

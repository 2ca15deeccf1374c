//! Replication: the cluster's clock ([`clock`]), openraft's types ([`types`]), the RocksDB database ([`db`]), the log
//! store ([`log_store`]), the state machine ([`state_machine`]), the peer network client
//! ([`network`]) and server ([`peer_server`]), and the node wrapper that ties them
//! together and offers writes, current reads and membership changes ([`node`]).

pub mod clock;
pub mod db;
pub mod hello;
pub mod log_store;
pub mod network;
pub mod node;
pub mod peer_server;
pub mod read_rounds;
pub mod snapshot_store;
pub mod state_machine;
pub mod types;

pub use node::{RaftNode, MEMBERSHIP_BOUND};
pub use types::{Member, NodeId, Raft, TypeConfig};

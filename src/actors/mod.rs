//! The node's actors and where they live. The actix `System` runs on one dedicated thread
//! (started by [`ActorSystem::start`], the only place actix and tokio meet); everything
//! else — axum, openraft, RocksDB's blocking calls — runs on the tokio multi-thread
//! runtime. Actors are reached only through small cloneable handles (`*Handle`), so HTTP
//! handlers and openraft never hold an `Addr` and a future swap of the actor library
//! stays inside this module. Heavy async work an actor starts is spawned onto the tokio
//! runtime; the actor only coordinates.

pub mod executor;
pub mod proposer;
pub mod registry;
pub mod scheduler;
pub mod supervisor;
pub mod system;

pub use executor::ExecutorHandle;
pub use proposer::ProposerHandle;
pub use registry::RegistryHandle;
pub use scheduler::SchedulerHandle;
pub use supervisor::SupervisorHandle;
pub use system::{ActorSystem, Actors};

/// Leadership as the leader-only actors see it: serving means this node is leader and
/// has applied an entry of its own term (DESIGN invariant 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, actix::Message)]
#[rtype(result = "()")]
pub struct Leadership {
    pub serving: bool,
    pub term: u64,
}

/// A request for a command the node itself proposes (no client idempotency key).
pub fn system_request(command: crate::state::Command) -> crate::state::Request {
    crate::state::Request {
        request_id: hex::encode(rand::random::<[u8; 16]>()),
        proposed_at_ms: chrono::Utc::now().timestamp_millis(),
        idempotency: None,
        command,
    }
}

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

/// The tick of a leader-only actor: running exactly while this node is the serving
/// leader, stopped at once when it steps down.
pub struct LeaderGate {
    pub leadership: Leadership,
    timer: Option<actix::SpawnHandle>,
}

impl LeaderGate {
    pub fn new() -> Self {
        LeaderGate {
            leadership: Leadership {
                serving: false,
                term: 0,
            },
            timer: None,
        }
    }

    /// Take a leadership change: stop the tick, and start it again every `every` if this
    /// node now serves as leader.
    pub fn switch<A>(
        &mut self,
        msg: Leadership,
        every: std::time::Duration,
        ctx: &mut actix::Context<A>,
        tick: fn(&mut A, &mut actix::Context<A>),
        actor: &'static str,
        node: crate::raft::NodeId,
    ) where
        A: actix::Actor<Context = actix::Context<A>>,
    {
        use actix::AsyncContext;
        if msg == self.leadership {
            return;
        }
        tracing::info!(
            node,
            serving = msg.serving,
            term = msg.term,
            actor,
            "leadership changed"
        );
        self.leadership = msg;
        if let Some(t) = self.timer.take() {
            ctx.cancel_future(t);
        }
        if msg.serving {
            self.timer = Some(ctx.run_interval(every, tick));
        }
    }
}

impl Default for LeaderGate {
    fn default() -> Self {
        Self::new()
    }
}

/// A request for a command the node itself proposes (no client idempotency key).
pub fn system_request(command: crate::state::Command) -> crate::state::Request {
    crate::state::Request {
        request_id: hex::encode(rand::random::<[u8; 16]>()),
        proposed_at_ms: chrono::Utc::now().timestamp_millis(),
        idempotency: None,
        command,
        subject: None,
        quota: None,
        shell_scope: false,
    }
}

//! Starting and stopping the actix system thread and the node's actors.

use std::sync::Arc;
use std::thread::JoinHandle;

use actix::{Actor, System};

use super::{
    executor::Executor, proposer::Proposer, registry::Registry, scheduler::Scheduler,
    supervisor::Supervisor, ExecutorHandle, ProposerHandle, RegistryHandle, SchedulerHandle,
    SupervisorHandle,
};
use crate::config::Config;
use crate::raft::RaftNode;

/// Handles to every actor of the node.
#[derive(Clone)]
pub struct Actors {
    pub proposer: ProposerHandle,
    pub registry: RegistryHandle,
    pub scheduler: SchedulerHandle,
    pub supervisor: SupervisorHandle,
    pub executor: ExecutorHandle,
}

/// The running actix system.
pub struct ActorSystem {
    system: System,
    thread: Option<JoinHandle<()>>,
    pub actors: Actors,
}

#[derive(Debug, thiserror::Error)]
#[error("actor system failed to start: {0}")]
pub struct StartError(String);

impl ActorSystem {
    /// Start the actix system on its own thread and the node's actors in it.
    pub fn start(node: RaftNode, config: Arc<Config>) -> Result<ActorSystem, StartError> {
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|e| StartError(format!("no tokio runtime: {e}")))?;
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("actix".into())
            .spawn(move || {
                let sys = System::new();
                sys.block_on(async move {
                    let proposer = ProposerHandle::new(
                        Proposer::new(node.clone(), rt.clone()).start(),
                        node.leader_wait(),
                    );
                    let stats = Arc::new(super::scheduler::Stats::default());
                    let scheduler = Scheduler::new(
                        node.clone(),
                        proposer.clone(),
                        rt.clone(),
                        config.scheduler.clone(),
                        stats.clone(),
                    );
                    let supervisor =
                        Supervisor::new(node.clone(), proposer.clone(), rt.clone(), config.clone());
                    let registry = RegistryHandle::new(Registry::new(node.db.clone()).start());
                    let executor = Executor::new(
                        node.clone(),
                        proposer.clone(),
                        registry.clone(),
                        rt.clone(),
                        &config,
                    );
                    let actors = Actors {
                        proposer,
                        registry,
                        scheduler: SchedulerHandle::new(scheduler.start(), stats),
                        supervisor: SupervisorHandle::new(supervisor.start()),
                        executor: ExecutorHandle::new(executor.start()),
                    };
                    // The receiver only goes away if start() itself is gone.
                    let _ = tx.send((System::current(), actors));
                });
                if let Err(e) = sys.run() {
                    tracing::error!(error = %e, "actix system stopped with an error");
                }
            })
            .map_err(|e| StartError(e.to_string()))?;
        let (system, actors) = rx
            .recv()
            .map_err(|_| StartError("actor thread exited during start".into()))?;
        Ok(ActorSystem {
            system,
            thread: Some(thread),
            actors,
        })
    }

    /// Stop every actor and wait for the thread.
    pub fn stop(mut self) {
        self.system.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

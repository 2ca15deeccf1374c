//! The executor actor (every node). On start it announces a new incarnation with a
//! heartbeat and waits until that is applied locally (the state machine then treats
//! whatever an earlier incarnation of this node was running as lost); only then does it
//! run work. It watches the `assignments` table for its node: a new assignment starts an
//! attempt, a vanished one (cancel, lease lost) kills it. Every `executor.heartbeat_ms`
//! it renews the leases of what it runs. Each finished attempt is reported as a fenced
//! `FinishAttempt`.
//!
//! Self-fencing: a lease is renewed by a committed heartbeat, and lasts at least
//! `lease_ms` from the moment that heartbeat was sent (apply stamps it later, with the
//! cluster clock). When no heartbeat has committed for `lease_ms − fence_margin_ms`, the
//! executor kills its running attempts and reports them lost, and starts nothing until a
//! heartbeat commits again. The leader expires a lease only when the cluster clock passes
//! it and a full lease has passed in the current term, so the attempts are dead before
//! the task can be handed to another node as long as a leader's clock steps by less than
//! the margin within a term (docs/architecture.md, "Leases and self-fencing").

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;
use tracing::{debug, info, warn, Instrument};

use super::{system_request, ProposerHandle, RegistryHandle};
use crate::config::{Config, ExecutorConfig};
use crate::executor::egress::Egress;
use crate::executor::sandbox::ShellPolicy;
use crate::executor::{self, AttemptSpec};
use crate::raft::RaftNode;
use crate::state::command::{AttemptRef, AttemptResult};
use crate::state::machine::keys;
use crate::state::model::{DagSpec, Run};
use crate::state::{Command, Outcome, Table};
use crate::telemetry::metrics as telemetry;

type TaskKey = (String, String);

/// How often the executor checks its renewal deadline (part of the fencing margin).
const FENCE_CHECK_EVERY: Duration = Duration::from_millis(200);

struct Running {
    attempt: u32,
    cancel: Option<oneshot::Sender<()>>,
    /// Stopped by this executor because its lease could not be renewed: reported lost.
    fenced: Arc<AtomicBool>,
    /// Ended here; kept until its assignment disappears from the state machine, so the
    /// same attempt is never started twice (the local state may lag the commit of its
    /// result).
    ended: bool,
}

pub struct Executor {
    node: RaftNode,
    proposer: ProposerHandle,
    registry: RegistryHandle,
    rt: tokio::runtime::Handle,
    config: ExecutorConfig,
    data_dir: PathBuf,
    log_retention: Duration,
    incarnation: String,
    ready: bool,
    /// When this node sent the last heartbeat that committed: every lease it holds lasts
    /// at least `lease_ms` from then (stamped later, on the leader).
    renewed_at: Option<Instant>,
    /// Attempts stopped for lack of renewal; nothing starts until a heartbeat commits.
    fenced: bool,
    running: HashMap<TaskKey, Running>,
    egress: Arc<Egress>,
    shell: Arc<ShellPolicy>,
}

impl Executor {
    pub fn new(
        node: RaftNode,
        proposer: ProposerHandle,
        registry: RegistryHandle,
        rt: tokio::runtime::Handle,
        config: &Config,
    ) -> Self {
        Executor {
            node,
            proposer,
            registry,
            rt,
            config: config.executor.clone(),
            data_dir: config.data_dir.clone(),
            log_retention: Duration::from_millis(config.retention.runs_ms),
            incarnation: hex::encode(rand::random::<[u8; 8]>()),
            ready: false,
            renewed_at: None,
            fenced: false,
            running: HashMap::new(),
            // `http_allow` was parsed when the config was validated.
            egress: Arc::new(Egress::from_config(config).unwrap_or_default()),
            shell: Arc::new(ShellPolicy::from_config(config)),
        }
    }

    fn heartbeat_command(&self) -> Command {
        let mut running: Vec<AttemptRef> = self
            .running
            .iter()
            .filter(|(_, r)| !r.ended && !r.fenced.load(Ordering::Acquire))
            .map(|((run_id, task_id), r)| AttemptRef {
                run_id: run_id.clone(),
                task_id: task_id.clone(),
                attempt: r.attempt,
            })
            .collect();
        running.sort();
        Command::Heartbeat {
            node: self.node.id,
            incarnation: self.incarnation.clone(),
            slots: self.config.slots,
            running,
            lease_ms: self.config.lease_ms,
        }
    }

    /// The instant after which this node's leases may be gone at the leader, less the
    /// margin: past it, nothing may run here.
    fn fence_deadline(&self) -> Option<Instant> {
        let lease = Duration::from_millis(self.config.lease_ms);
        let margin = Duration::from_millis(self.config.fence_margin());
        self.renewed_at.map(|t| t + lease.saturating_sub(margin))
    }

    /// Self-fencing: when no heartbeat has committed for `lease − margin`, stop every
    /// attempt running here (process groups killed) and report them lost, so that no
    /// attempt keeps running while the leader hands its task to another node.
    fn fence_if_expired(&mut self) {
        let Some(deadline) = self.fence_deadline() else {
            return;
        };
        if Instant::now() < deadline || self.fenced {
            return;
        }
        self.fenced = true;
        let since = self.renewed_at.map(|t| t.elapsed().as_millis() as u64);
        for ((run_id, task_id), r) in &mut self.running {
            if r.ended {
                continue;
            }
            warn!(node = self.node.id, run_id = %run_id, task_id = %task_id, attempt = r.attempt,
                  since_renewal_ms = since, "lease not renewed in time: stopping the attempt (self-fencing)");
            r.fenced.store(true, Ordering::Release);
            if let Some(c) = r.cancel.take() {
                let _ = c.send(());
            }
        }
    }

    /// A heartbeat sent at `sent` committed: leases are renewed, work may run again.
    fn renewed(&mut self, sent: Instant, ctx: &mut Context<Self>) {
        if self.renewed_at.is_none_or(|t| sent > t) {
            self.renewed_at = Some(sent);
        }
        if self.fenced && self.fence_deadline().is_some_and(|d| Instant::now() < d) {
            info!(
                node = self.node.id,
                "heartbeats commit again: executor resumes"
            );
            self.fenced = false;
            self.reconcile(ctx);
        }
    }

    /// Compare what the state machine assigns to this node with what runs here.
    fn reconcile(&mut self, ctx: &mut Context<Self>) {
        if !self.ready {
            return;
        }
        self.fence_if_expired();
        if self.fenced {
            return;
        }
        let prefix = keys::prefix(&[&self.node.id.to_be_bytes()]);
        let assigned = match self
            .node
            .db
            .scan_prefix(Table::Assignments, &prefix, None, usize::MAX)
        {
            Ok(a) => a,
            Err(e) => {
                warn!(node = self.node.id, error = %e, "cannot read assignments");
                return;
            }
        };
        let mut wanted: HashMap<TaskKey, u32> = HashMap::new();
        for (k, v) in assigned {
            let Some(rest) = k.get(prefix.len()..) else {
                continue;
            };
            let Some(sep) = rest.iter().position(|b| *b == 0) else {
                continue;
            };
            let run_id = String::from_utf8_lossy(&rest[..sep]).into_owned();
            let task_id = String::from_utf8_lossy(&rest[sep + 1..]).into_owned();
            let Ok(arr) = <[u8; 4]>::try_from(v.as_slice()) else {
                continue;
            };
            wanted.insert((run_id, task_id), u32::from_be_bytes(arr));
        }
        // Kill what is no longer ours (cancelled, or the lease was lost).
        let stale: Vec<TaskKey> = self
            .running
            .iter()
            .filter(|(k, r)| wanted.get(*k) != Some(&r.attempt))
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            if let Some(mut r) = self.running.remove(&k) {
                if r.ended {
                    continue;
                }
                info!(node = self.node.id, run_id = %k.0, task_id = %k.1, attempt = r.attempt, "attempt no longer assigned here; stopping it");
                if let Some(c) = r.cancel.take() {
                    let _ = c.send(());
                }
            }
        }
        for ((run_id, task_id), attempt) in wanted {
            let key = (run_id.clone(), task_id.clone());
            if self.running.contains_key(&key) {
                continue;
            }
            let (tx, rx) = oneshot::channel();
            let fenced = Arc::new(AtomicBool::new(false));
            self.running.insert(
                key,
                Running {
                    attempt,
                    cancel: Some(tx),
                    fenced: fenced.clone(),
                    ended: false,
                },
            );
            self.start(ctx, run_id, task_id, attempt, rx, fenced);
        }
    }

    fn start(
        &mut self,
        ctx: &mut Context<Self>,
        run_id: String,
        task_id: String,
        attempt: u32,
        cancel: oneshot::Receiver<()>,
        fenced: Arc<AtomicBool>,
    ) {
        let node = self.node.clone();
        let proposer = self.proposer.clone();
        let registry = self.registry.clone();
        let data_dir = self.data_dir.clone();
        let log_cap = self.config.log_cap_bytes;
        let egress = self.egress.clone();
        let shell = self.shell.clone();
        let me = ctx.address();
        debug!(node = node.id, run_id = %run_id, task_id = %task_id, attempt, "starting attempt");
        // Every line logged for this attempt carries its ids (dag_id once the run is read).
        let span = tracing::info_span!("attempt", run_id = %run_id, task_id = %task_id, attempt, dag_id = tracing::field::Empty);
        self.rt.spawn(async move {
            let started = Instant::now();
            let result = match load(&node, &registry, &run_id).await {
                Ok((run, spec)) => match spec.tasks.iter().find(|t| t.task_id == task_id) {
                    Some(task) => {
                        tracing::Span::current().record("dag_id", run.dag_id.as_str());
                        let a = AttemptSpec { run: &run, task, attempt, data_dir: &data_dir, log_cap, egress: &egress, shell: &shell };
                        let pg_dir = data_dir.join("executor").join("pgids");
                        let mut pg_file = None;
                        let r = executor::run_attempt(a, cancel, |pgid| {
                            // Remember the group so a restart can kill what a crash left.
                            let f = pg_dir.join(pgid.to_string());
                            if std::fs::create_dir_all(&pg_dir).and_then(|_| std::fs::write(&f, b"")).is_ok() {
                                pg_file = Some(f);
                            }
                        })
                        .await;
                        if let Some(f) = pg_file {
                            let _ = std::fs::remove_file(f);
                        }
                        r
                    }
                    None => AttemptResult::Failed { exit_code: None, error: format!("task {task_id} is not in the dag version") },
                },
                Err(e) => AttemptResult::Failed { exit_code: None, error: e },
            };
            let result = if fenced.load(Ordering::Acquire) {
                AttemptResult::Lost {
                    error: format!("node {} could not renew its lease and stopped the attempt", node.id),
                }
            } else {
                result
            };
            let outcome = match &result {
                AttemptResult::Success { .. } => "success",
                AttemptResult::Failed { .. } => "failed",
                AttemptResult::TimedOut { .. } => "timed_out",
                AttemptResult::Lost { .. } => "lost",
            };
            if fenced.load(Ordering::Acquire) {
                metrics::counter!(telemetry::LEASES_LOST).increment(1);
            }
            metrics::counter!(telemetry::ATTEMPTS, "result" => outcome).increment(1);
            metrics::histogram!(telemetry::ATTEMPT_SECONDS, "result" => outcome)
                .record(started.elapsed().as_secs_f64());
            info!(node = node.id, run_id = %run_id, task_id = %task_id, attempt, result = ?result, "attempt ended");
            let finish = Command::FinishAttempt {
                attempt: AttemptRef { run_id: run_id.clone(), task_id: task_id.clone(), attempt },
                node: node.id,
                result,
            };
            // Keep trying while the lease may still be ours; after that the supervisor
            // retries the task elsewhere and a late report is fenced off anyway.
            let req = system_request(finish);
            for i in 0..30u32 {
                match proposer.propose(req.clone()).await {
                    Ok(r) => {
                        if let Outcome::StaleAttempt { current } = r.outcome {
                            info!(run_id = %run_id, task_id = %task_id, attempt, current, "late result rejected (fenced)");
                        }
                        break;
                    }
                    Err(e) => {
                        warn!(run_id = %run_id, task_id = %task_id, attempt, error = %e, "cannot report result yet");
                        tokio::time::sleep(Duration::from_millis(200 * (i as u64 + 1)).min(Duration::from_secs(2))).await;
                    }
                }
            }
            me.do_send(Ended { key: (run_id, task_id), attempt });
        }.instrument(span));
    }
}

/// The run and the DAG version it executes.
async fn load(
    node: &RaftNode,
    registry: &RegistryHandle,
    run_id: &str,
) -> Result<(Run, DagSpec), String> {
    let run: Run = node
        .db
        .get_json(Table::Runs.name(), run_id.as_bytes())
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("run {run_id} not found"))?;
    let spec = registry
        .dag_version(&run.tenant, &run.dag_id, run.dag_version)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("dag version {} of run {run_id} not found", run.dag_version))?;
    Ok((run, spec))
}

impl Actor for Executor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // A crash leaves no one to stop the process groups it started: stop them now.
        let pg_dir = self.data_dir.join("executor").join("pgids");
        if let Ok(entries) = std::fs::read_dir(&pg_dir) {
            for e in entries.flatten() {
                if let Some(pgid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) {
                    warn!(
                        node = self.node.id,
                        pgid, "killing a process group left by a previous run of this node"
                    );
                    executor::kill_group(pgid);
                }
                let _ = std::fs::remove_file(e.path());
            }
        }
        // Announce this incarnation and wait until it is applied here before running work.
        let proposer = self.proposer.clone();
        let node = self.node.clone();
        let hello = system_request(self.heartbeat_command());
        let me = ctx.address();
        self.rt.spawn(async move {
            loop {
                let sent = Instant::now();
                if proposer.propose(hello.clone()).await.is_ok()
                    && node.linearizable_barrier().await.is_ok()
                {
                    me.do_send(Ready { sent });
                    return;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        // Re-check assignments whenever the state machine applies something.
        let mut applied = self.node.sm.subscribe_applied();
        let me = ctx.address();
        self.rt.spawn(async move {
            while applied.changed().await.is_ok() {
                if me.try_send(Reconcile).is_err() && !me.connected() {
                    return;
                }
            }
        });
        // Output and working dirs of runs older than the retention go, once an hour.
        let roots = vec![self.data_dir.join("logs"), self.shell.work_root.clone()];
        let keep = self.log_retention;
        ctx.run_interval(Duration::from_secs(3600), move |act, _| {
            let roots = roots.clone();
            act.rt
                .spawn_blocking(move || executor::remove_older_than(&roots, keep));
        });
        let every = Duration::from_millis(self.config.heartbeat_ms);
        ctx.run_interval(every, |act, ctx| {
            if !act.ready {
                return;
            }
            let proposer = act.proposer.clone();
            let req = system_request(act.heartbeat_command());
            let me = ctx.address();
            act.rt.spawn(async move {
                let sent = Instant::now();
                match proposer.propose(req).await {
                    Ok(_) => me.do_send(Renewed { sent }),
                    Err(e) => debug!(error = %e, "heartbeat not committed"),
                }
            });
        });
        // Watch the renewal deadline more often than heartbeats go out.
        ctx.run_interval(FENCE_CHECK_EVERY, |act, _| {
            if act.ready {
                act.fence_if_expired();
            }
        });
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Ready {
    sent: Instant,
}

impl Handler<Ready> for Executor {
    type Result = ();
    fn handle(&mut self, m: Ready, ctx: &mut Context<Self>) {
        info!(node = self.node.id, incarnation = %self.incarnation, "executor ready");
        self.ready = true;
        self.renewed_at = Some(m.sent);
        self.reconcile(ctx);
    }
}

/// A heartbeat sent at `sent` committed.
#[derive(Message)]
#[rtype(result = "()")]
struct Renewed {
    sent: Instant,
}

impl Handler<Renewed> for Executor {
    type Result = ();
    fn handle(&mut self, m: Renewed, ctx: &mut Context<Self>) {
        self.renewed(m.sent, ctx);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Reconcile;

impl Handler<Reconcile> for Executor {
    type Result = ();
    fn handle(&mut self, _: Reconcile, ctx: &mut Context<Self>) {
        self.reconcile(ctx);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Ended {
    key: TaskKey,
    attempt: u32,
}

impl Handler<Ended> for Executor {
    type Result = ();
    fn handle(&mut self, m: Ended, ctx: &mut Context<Self>) {
        if let Some(r) = self.running.get_mut(&m.key) {
            if r.attempt == m.attempt {
                r.ended = true;
                r.cancel = None;
            }
        }
        self.reconcile(ctx);
    }
}

#[derive(Message)]
#[rtype(result = "(usize, u32, bool)")]
struct Slots;

impl Handler<Slots> for Executor {
    type Result = MessageResult<Slots>;
    fn handle(&mut self, _: Slots, _: &mut Context<Self>) -> Self::Result {
        let running = self.running.values().filter(|r| !r.ended).count();
        MessageResult((running, self.config.slots, self.ready))
    }
}

/// Cheap handle to the executor.
#[derive(Clone)]
pub struct ExecutorHandle {
    addr: Addr<Executor>,
}

impl ExecutorHandle {
    pub(super) fn new(addr: Addr<Executor>) -> Self {
        ExecutorHandle { addr }
    }

    /// `(running, slots, ready)` on this node.
    pub async fn slots(&self) -> Option<(usize, u32, bool)> {
        self.addr.send(Slots).await.ok()
    }
}

//! The executor actor (every node). On start it announces a new incarnation with a
//! heartbeat and waits until that is applied locally (the state machine then treats
//! whatever an earlier incarnation of this node was running as lost); only then does it
//! run work. It watches the `assignments` table for its node: a new assignment starts an
//! attempt, a vanished one (cancel, lease lost) kills it. Every `executor.heartbeat_ms`
//! it renews the leases of what it runs. Each finished attempt is reported as a fenced
//! `FinishAttempt`.
//!
//! Self-fencing, per attempt ([`crate::executor::fencing`]): an attempt runs only while
//! its lease *as applied on this node* is more than `fence_margin_ms` ahead of the cluster
//! clock. That holds at the start (a node whose applied state lags may see an assignment
//! whose lease has already run out at the leader: it reports it lost instead of running
//! it) and is re-read every 200 ms; heartbeats renew the lease at the leader, and the
//! renewal counts here once it is applied here. An attempt past its deadline is killed
//! (its process group) and reported lost — by this actor, and by the node's fence keeper
//! process when the node itself is stopped or dead. The leader expires a lease only when
//! the cluster clock passes it and a full lease has passed in the current term, so the
//! attempts are dead before the task can be handed to another node as long as a leader's
//! clock steps by less than the margin within a term (docs/architecture.md, "Leases and
//! self-fencing").

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;
use tracing::{debug, info, warn, Instrument};

use super::{system_request, ProposerHandle, RegistryHandle};
use crate::config::{Config, ExecutorConfig};
use crate::executor::cgroup::Cgroups;
use crate::executor::egress::Egress;
use crate::executor::fencing::{AttemptFence, KeeperLink};
use crate::executor::leftovers::GroupRecords;
use crate::executor::sandbox::ShellPolicy;
use crate::executor::{self, AttemptSpec};
use crate::raft::RaftNode;
use crate::state::census::RunView;
use crate::state::command::{AttemptRef, AttemptResult};
use crate::state::machine::keys;
use crate::state::model::{DagSpec, Run, TaskState};
use crate::state::{Command, Outcome, Table};
use crate::telemetry::metrics as telemetry;

type TaskKey = (String, String);

/// How often the executor checks its renewal deadline (part of the fencing margin).
const FENCE_CHECK_EVERY: Duration = Duration::from_millis(200);

struct Running {
    attempt: u32,
    cancel: Option<oneshot::Sender<()>>,
    /// Its deadline; fenced when stopped for want of renewal (then reported lost).
    fence: Arc<AttemptFence>,
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
    running: HashMap<TaskKey, Running>,
    keeper: Arc<KeeperLink>,
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
        let mut shell = ShellPolicy::from_config(config);
        if shell.enabled && config.executor.shell_cgroups {
            shell.cgroups = Cgroups::setup(&config.data_dir);
        }
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
            running: HashMap::new(),
            keeper: Arc::new(KeeperLink::spawn(shell.cgroups.as_ref())),
            // `http_allow` was parsed when the config was validated.
            egress: Arc::new(Egress::from_config(config).unwrap_or_default()),
            shell: Arc::new(shell),
        }
    }

    fn heartbeat_command(&self) -> Command {
        let mut running: Vec<AttemptRef> = self
            .running
            .iter()
            .filter(|(_, r)| !r.ended && !r.fence.is_fenced())
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

    /// Renew the leases of what runs here (and say this node is alive).
    fn heartbeat(&self) {
        let proposer = self.proposer.clone();
        let req = system_request(self.heartbeat_command());
        self.rt.spawn(async move {
            if let Err(e) = proposer.propose(req).await {
                debug!(error = %e, "heartbeat not committed");
            }
        });
    }

    /// Self-fencing: every attempt may run only while the lease this node has applied for
    /// it is more than the margin ahead of the cluster clock. Move each attempt's deadline
    /// to what the applied state says now (the keeper follows), and stop every attempt
    /// past it (process group killed; reported lost), so that no attempt keeps running
    /// while the leader hands its task to another node.
    fn refresh_fences(&mut self) {
        // Uncalibrated (voters added, samples aged out), the clock is not trusted to move
        // a deadline either way: deadlines stay where they are and still expire.
        let calibrated = self.node.clock_calibrated();
        // Per attempt: its applied lease and the deadline the clock gives it.
        type Reading = Option<(i64, Option<Instant>)>;
        let leases: Vec<(TaskKey, Reading)> = self
            .running
            .iter()
            .filter(|(_, r)| !r.ended && !r.fence.is_fenced())
            .map(|((run_id, task_id), r)| {
                let lease = self
                    .applied_lease(run_id, task_id, r.attempt)
                    .map(|l| (l, calibrated.then(|| self.deadline_for(l))));
                ((run_id.clone(), task_id.clone()), lease)
            })
            .collect();
        for (key, lease) in leases {
            let Some(r) = self.running.get_mut(&key) else {
                continue;
            };
            let alive = match lease {
                Some((l, target)) => r.fence.observe(l, target, &self.keeper),
                // No longer this node's running attempt here: stop it.
                None => false,
            };
            if !alive {
                warn!(node = self.node.id, run_id = %key.0, task_id = %key.1, attempt = r.attempt,
                      clock_calibrated = calibrated, lease_until_ms = lease.map_or(0, |l| l.0),
                      cluster_now_ms = self.node.clock.now_ms(),
                      late_ms = Instant::now().saturating_duration_since(r.fence.deadline()).as_millis() as u64,
                      "lease not renewed in time: stopping the attempt (self-fencing)");
                r.fence.fence();
                if let Some(c) = r.cancel.take() {
                    let _ = c.send(());
                }
            }
        }
    }

    /// The lease (cluster-clock ms) of `attempt` as applied on this node, while it is the
    /// task's current attempt, running, and this node's. The applied lease only grows
    /// when a heartbeat that renewed it is applied here, and the leader never expires a
    /// lease before it, so a deadline taken from it holds whether or not the leader has
    /// meanwhile given the task away.
    /// Read every [`FENCE_CHECK_EVERY`] for each running attempt, so it decodes only the
    /// run's task states and leases ([`RunView`]), not the whole run.
    fn applied_lease(&self, run_id: &str, task_id: &str, attempt: u32) -> Option<i64> {
        let bytes = match self.node.db.get(Table::Runs.name(), run_id.as_bytes()) {
            Ok(bytes) => bytes?,
            Err(e) => {
                warn!(node = self.node.id, run_id = %run_id, error = %e, "cannot read the run of an assignment");
                return None;
            }
        };
        let Some(run) = RunView::decode(&bytes) else {
            warn!(node = self.node.id, run_id = %run_id, "cannot decode the run of an assignment");
            return None;
        };
        let inst = run.tasks.get(task_id)?;
        if inst.attempt != attempt || inst.state != TaskState::Running {
            return None;
        }
        inst.attempts
            .iter()
            .find(|a| a.attempt == attempt && a.node == self.node.id)
            .map(|a| a.lease_until_ms)
    }

    /// The local instant at which a lease, less the margin, is reached on the cluster
    /// clock (now, if it already has been).
    fn deadline_for(&self, lease_until: i64) -> Instant {
        let left = lease_until
            .saturating_sub(self.config.fence_margin() as i64)
            .saturating_sub(self.node.clock.now_ms())
            .max(0);
        let now = Instant::now();
        now.checked_add(Duration::from_millis(left as u64))
            .unwrap_or(now)
    }

    /// Compare what the state machine assigns to this node with what runs here.
    fn reconcile(&mut self, ctx: &mut Context<Self>) {
        if !self.ready {
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
                // Already over here (its task drops the receiver when the attempt ends,
                // before reporting): the assignment went away because its own result was
                // committed, which can apply before the task tells this actor it ended.
                let finished = r.cancel.as_ref().is_none_or(|c| c.is_closed());
                if r.ended || finished {
                    continue;
                }
                info!(node = self.node.id, run_id = %k.0, task_id = %k.1, attempt = r.attempt, "attempt no longer assigned here; stopping it");
                if let Some(c) = r.cancel.take() {
                    let _ = c.send(());
                }
            }
        }
        // Leases are read against the cluster clock: start nothing until it is the
        // voters' median (checked only when there is something to start).
        wanted.retain(|k, _| !self.running.contains_key(k));
        if wanted.is_empty() || !self.node.clock_calibrated() {
            return;
        }
        // A lease already half gone when its attempt starts (the node applied or started
        // it late) is renewed now rather than at the next regular heartbeat.
        let soon = Instant::now()
            + Duration::from_millis(
                self.config
                    .lease_ms
                    .saturating_sub(self.config.fence_margin())
                    / 2,
            );
        let mut renew_now = false;
        for ((run_id, task_id), attempt) in wanted {
            let key = (run_id.clone(), task_id.clone());
            if self.running.contains_key(&key) {
                continue;
            }
            let (tx, rx) = oneshot::channel();
            let lease = self.applied_lease(&run_id, &task_id, attempt);
            let deadline = lease
                .map(|l| self.deadline_for(l))
                .filter(|d| *d > Instant::now());
            renew_now |= deadline.is_some_and(|d| d < soon);
            debug!(node = self.node.id, run_id = %run_id, task_id = %task_id, attempt,
                   lease_until_ms = lease.unwrap_or(0), cluster_now_ms = self.node.clock.now_ms(),
                   clock_correction_ms = self.node.clock.correction_ms(),
                   deadline_in_ms = deadline.map_or(0, |d| d.saturating_duration_since(Instant::now()).as_millis() as u64),
                   "attempt assigned here: fence deadline");
            let fence = Arc::new(AttemptFence::new(
                deadline.unwrap_or_else(Instant::now),
                lease.unwrap_or(0),
            ));
            if deadline.is_none() {
                // Started now it could still run when the leader gives the task to
                // another node: report it lost without running it.
                info!(node = self.node.id, run_id = %run_id, task_id = %task_id, attempt,
                      "assignment applied here too late to run within its lease; reporting it lost");
                fence.fence();
            }
            self.running.insert(
                key,
                Running {
                    attempt,
                    cancel: Some(tx),
                    fence: fence.clone(),
                    ended: false,
                },
            );
            self.start(ctx, run_id, task_id, attempt, rx, fence);
        }
        if renew_now {
            self.heartbeat();
        }
    }

    fn start(
        &mut self,
        ctx: &mut Context<Self>,
        run_id: String,
        task_id: String,
        attempt: u32,
        cancel: oneshot::Receiver<()>,
        fence: Arc<AttemptFence>,
    ) {
        let node = self.node.clone();
        let proposer = self.proposer.clone();
        let registry = self.registry.clone();
        let data_dir = self.data_dir.clone();
        let log_cap = self.config.log_cap_bytes;
        let egress = self.egress.clone();
        let shell = self.shell.clone();
        let keeper = self.keeper.clone();
        let me = ctx.address();
        debug!(node = node.id, run_id = %run_id, task_id = %task_id, attempt, "starting attempt");
        // Every line logged for this attempt carries its ids (dag_id once the run is read).
        let span = tracing::info_span!("attempt", run_id = %run_id, task_id = %task_id, attempt, dag_id = tracing::field::Empty);
        self.rt.spawn(async move {
            let started = Instant::now();
            // Dropped once the attempt is over, whichever way: the actor reads a closed
            // channel as "already ended here" (see `reconcile`).
            let mut cancel = Some(cancel);
            let result = if fence.expired() {
                AttemptResult::Lost { error: String::new() }
            } else { match load(&node, &registry, &run_id).await {
                Ok((run, spec, shell_granted)) => match spec.tasks.iter().find(|t| t.task_id == task_id) {
                    Some(task) => {
                        tracing::Span::current().record("dag_id", run.dag_id.as_str());
                        let a = AttemptSpec { run: &run, task, attempt, data_dir: &data_dir, log_cap, egress: &egress, shell: &shell, shell_granted, fence: &fence };
                        let records = GroupRecords::new(&data_dir);
                        let mut pg_file = None;
                        let cancel = cancel.take().expect("the cancel receiver is taken once, here");
                        let r = executor::run_attempt(a, cancel, |pgid| {
                            // The keeper kills the group at its deadline if this node
                            // cannot; the file lets a restart kill what a crash left.
                            fence.spawned(pgid, &keeper);
                            debug!(pgid, deadline_in_ms = fence.deadline().saturating_duration_since(Instant::now()).as_millis() as u64,
                                   "attempt process started");
                            pg_file = records.record(pgid);
                        })
                        .await;
                        fence.exited(&keeper);
                        if let Some(f) = pg_file {
                            let _ = std::fs::remove_file(f);
                        }
                        r
                    }
                    None => AttemptResult::Failed { exit_code: None, error: format!("task {task_id} is not in the dag version") },
                },
                Err(e) => AttemptResult::Failed { exit_code: None, error: e },
            } };
            drop(cancel);
            // Stopped by a fence (this actor's, or the keeper's kill at the deadline):
            // lost, not failed. A success just past the deadline still stands — the
            // leader gives the task away only after the margin.
            let lost = fence.is_fenced()
                || (!matches!(result, AttemptResult::Success { .. }) && fence.expired());
            let result = if lost {
                AttemptResult::Lost {
                    error: format!("node {} could not renew its lease in time and stopped the attempt", node.id),
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
            if lost {
                metrics::counter!(telemetry::LEASES_LOST).increment(1);
            }
            metrics::counter!(telemetry::ATTEMPTS, "result" => outcome).increment(1);
            metrics::histogram!(telemetry::ATTEMPT_SECONDS, "result" => outcome)
                .record(started.elapsed().as_secs_f64());
            // The span carries the run, task, attempt and DAG; a failure is a warning.
            match &result {
                AttemptResult::Success { exit_code } => info!(outcome, exit_code = *exit_code, "attempt ended"),
                AttemptResult::Failed { exit_code, error } => warn!(outcome, exit_code = *exit_code, error = %error, "attempt ended"),
                AttemptResult::TimedOut { error } | AttemptResult::Lost { error } => warn!(outcome, error = %error, "attempt ended"),
            }
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

/// The run, the DAG version it executes, and whether that version may run shell tasks:
/// from protocol 11 only with the grant apply recorded for a writer holding
/// `orchestrator:shell` (the protocol is read first: the raise grants the older versions
/// in the same write, so a version read after it has its grant).
async fn load(
    node: &RaftNode,
    registry: &RegistryHandle,
    run_id: &str,
) -> Result<(Run, DagSpec, bool), String> {
    let granted_by_protocol = node.applied_protocol()? < 11;
    let run: Run = node
        .db
        .get_json(Table::Runs.name(), run_id.as_bytes())
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("run {run_id} not found"))?;
    let stored = registry
        .dag_version(&run.tenant, &run.dag_id, run.dag_version)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("dag version {} of run {run_id} not found", run.dag_version))?;
    let shell_granted = granted_by_protocol || stored.shell_grant.is_some();
    Ok((run, stored.spec, shell_granted))
}

impl Actor for Executor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // A crash can leave process groups running past the keeper (a keeper killed with
        // its node): stop those that are still this node's.
        GroupRecords::new(&self.data_dir).kill_leftovers(self.node.id, self.shell.cgroups.as_ref());
        if let Some(c) = &self.shell.cgroups {
            c.sweep(&self.data_dir);
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
        ctx.run_interval(every, |act, _| {
            if act.ready {
                act.heartbeat();
            }
        });
        // Follow the applied leases more often than heartbeats go out.
        ctx.run_interval(FENCE_CHECK_EVERY, |act, _| {
            if act.ready {
                act.refresh_fences();
            }
            // A keeper that died is replaced, and told what it must hold.
            act.keeper.check();
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
        debug!(
            node = self.node.id,
            announce_ms = m.sent.elapsed().as_millis() as u64,
            "incarnation applied"
        );
        self.ready = true;
        self.reconcile(ctx);
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

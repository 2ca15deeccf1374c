//! The run supervisor actor (leader only). Assignment of ready tasks happens inside the
//! state machine as results arrive; this actor supplies what only time brings: every
//! `scheduler.supervise_ms` it proposes a term-fenced `Supervise` (expired leases, due
//! retries, SLA misses, queued runs waiting for a slot) while runs are active; every
//! second it delivers pending webhooks (bounded retries, never blocking a tick) and
//! acknowledges them; every `retention.purge_every_ms` it proposes a `Purge` (again at
//! the next tick while a purge reports more to do); and every second it asks the
//! proposer to check whether the replicated protocol can be raised.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use tracing::{debug, info, warn};

use super::{system_request, LeaderGate, Leadership, ProposerHandle};
use crate::config::Config;
use crate::executor::egress::{self, Egress};
use crate::raft::RaftNode;
use crate::state::command::Retention;
use crate::state::model::{NodeInfo, Notification};
use crate::state::{Command, Outcome, Table};

/// How often a serving leader checks whether the cluster can move to a newer protocol
/// (a local read once it is at this binary's version). A fresh cluster starts at version 1
/// and should reach the newest soon after its voters answer: manual triggers in the
/// same millisecond still share a run before version 4, and the chaos suite saw one.
const PROTOCOL_CHECK_EVERY: Duration = Duration::from_secs(1);

/// The replicated protocol version as applied on this node (1 when never raised).
fn applied_protocol(node: &RaftNode) -> Option<u32> {
    node.applied_protocol()
        .map_err(|e| warn!(error = %e, "cannot read the protocol version"))
        .ok()
}

/// The longest lease any executor node holds its attempts under (each node's own, as its
/// heartbeats registered it; this node's configuration when none has yet).
fn longest_lease(node: &RaftNode, config: &Config) -> Duration {
    let registered = node
        .db
        .scan_prefix(Table::Nodes, b"", None, usize::MAX)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(_, v)| serde_json::from_slice::<NodeInfo>(&v).ok())
        .map(|n| n.lease_ms)
        .max();
    Duration::from_millis(registered.unwrap_or(config.executor.lease_ms))
}

/// Whether a leader that has served for `serving_for` may propose a `Supervise` pass
/// (which expires leases) at replicated `protocol`. From protocol 2, apply itself lets no
/// lease expire before a full lease of the current term's clock has passed. Protocol 1
/// has no such rule, so the leader holds its passes for the longest lease after it began
/// serving: an executor cut off together with the old leader stops its attempts (self-
/// fencing, a margin before its lease runs out) before a new term can give their tasks
/// away, at every protocol. Chaos Run 6 saw the rule missing: a fresh cluster's leader
/// was cut off before it raised the protocol, and its successor expired the lease at once.
pub fn may_supervise(protocol: u32, serving_for: Duration, longest_lease: Duration) -> bool {
    protocol >= 2 || serving_for >= longest_lease
}

pub struct Supervisor {
    node: RaftNode,
    proposer: ProposerHandle,
    rt: tokio::runtime::Handle,
    config: Arc<Config>,
    gate: LeaderGate,
    busy: bool,
    last_notify: Instant,
    last_purge: Instant,
    last_protocol_check: Instant,
    /// When this node began serving as leader in `serving_term`.
    serving_since: Instant,
    serving_term: u64,
    delivering: Arc<Mutex<HashSet<String>>>,
    egress: Arc<Egress>,
}

impl Supervisor {
    pub fn new(
        node: RaftNode,
        proposer: ProposerHandle,
        rt: tokio::runtime::Handle,
        config: Arc<Config>,
    ) -> Self {
        // `http_allow` was parsed when the config was validated.
        let egress = Arc::new(Egress::from_config(&config).unwrap_or_default());
        Supervisor {
            node,
            proposer,
            rt,
            config,
            gate: LeaderGate::new(),
            busy: false,
            last_notify: Instant::now(),
            last_purge: Instant::now(),
            last_protocol_check: Instant::now() - PROTOCOL_CHECK_EVERY,
            serving_since: Instant::now(),
            serving_term: 0,
            delivering: Arc::new(Mutex::new(HashSet::new())),
            egress,
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        if !self.gate.leadership.serving {
            return;
        }
        if self.last_notify.elapsed() >= Duration::from_secs(1) {
            self.last_notify = Instant::now();
            self.deliver_notifications();
        }
        let term = self.gate.leadership.term;
        let node = self.node.clone();
        let proposer = self.proposer.clone();
        // Not behind the pass: a previous term's pass may still be waiting for a commit.
        // The proposer runs one check at a time (it asks every voter, which can take a
        // timeout when one is down, so it runs beside the pass, not in it).
        if self.last_protocol_check.elapsed() >= PROTOCOL_CHECK_EVERY {
            self.last_protocol_check = Instant::now();
            proposer.check_protocol(term);
        }
        if self.busy {
            return;
        }
        self.busy = true;
        // Purge cutoffs from the voters' median clock, and only once this node reads it
        // from a majority: a leader whose own clock runs fast purges nothing early.
        let purge = (self.last_purge.elapsed()
            >= Duration::from_millis(self.config.retention.purge_every_ms)
            && self.node.clock_calibrated())
        .then(|| {
            self.last_purge = Instant::now();
            let now = self.node.clock.now_ms();
            let r = &self.config.retention;
            Command::Purge {
                term,
                before_ms: now - r.runs_ms as i64,
                records_before_ms: now - r.idempotency_ms as i64,
                keep: Some(Retention {
                    runs_ms: r.runs_ms,
                    records_ms: r.idempotency_ms,
                }),
            }
        });
        let serving_for = self.serving_since.elapsed();
        let config = self.config.clone();
        let job = self.rt.spawn(async move {
            let active = node
                .db
                .scan_prefix(Table::ActiveRuns, b"", None, 1)
                .map(|v| !v.is_empty())
                .unwrap_or(false);
            let protocol = applied_protocol(&node).unwrap_or(1);
            let lease = if active && protocol < 2 {
                longest_lease(&node, &config)
            } else {
                Duration::ZERO
            };
            if active && !may_supervise(protocol, serving_for, lease) {
                debug!(
                    term,
                    protocol,
                    serving_ms = serving_for.as_millis() as u64,
                    lease_ms = lease.as_millis() as u64,
                    "supervise held: protocol 1 expires leases without waiting for the term"
                );
            } else if active {
                if let Err(e) = proposer
                    .propose(system_request(Command::Supervise { term }))
                    .await
                {
                    warn!(error = %e, "supervise proposal failed");
                }
            }
            let mut purge_full = false;
            if let Some(cmd) = purge {
                match proposer.propose(system_request(cmd)).await {
                    Ok(r) => {
                        purge_full = matches!(r.outcome, Outcome::Purged { more: true, .. });
                        info!(outcome = ?r.outcome, "history purged")
                    }
                    Err(e) => warn!(error = %e, "purge proposal failed"),
                }
            }
            purge_full
        });
        let every = Duration::from_millis(self.config.retention.purge_every_ms);
        ctx.spawn(
            async move { job.await.unwrap_or(false) }
                .into_actor(self)
                .map(move |purge_full, act, _| {
                    act.busy = false;
                    // A purge that stopped at its chunk goes on at the next tick.
                    if purge_full {
                        act.last_purge = Instant::now() - every;
                    }
                }),
        );
    }

    /// Deliver every pending webhook not already being delivered, in the background.
    fn deliver_notifications(&mut self) {
        let pending = match self
            .node
            .db
            .scan_prefix(Table::Notifications, b"", None, 256)
        {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cannot read notifications");
                return;
            }
        };
        for (k, v) in pending {
            let key = String::from_utf8_lossy(&k).into_owned();
            {
                let mut set = self.delivering.lock().unwrap_or_else(|p| p.into_inner());
                if !set.insert(key.clone()) {
                    continue;
                }
            }
            let Ok(n) = serde_json::from_slice::<Notification>(&v) else {
                continue;
            };
            let egress = self.egress.clone();
            let secret = self
                .config
                .executor
                .webhook_secret_for(&n.tenant)
                .map(str::to_string);
            let proposer = self.proposer.clone();
            let delivering = self.delivering.clone();
            self.rt.spawn(async move {
                let body = serde_json::json!({
                    "event": n.event, "tenant": n.tenant, "dag_id": n.dag_id,
                    "run_id": n.run_id, "state": n.run_state,
                })
                .to_string();
                let mut delivered = false;
                for attempt in 0..3u32 {
                    // Resolved and checked at every try, and sent to the checked address.
                    let http = match egress.client_for(&n.tenant, &n.url, Duration::from_secs(5)).await {
                        Ok(c) => c,
                        Err(e) => {
                            warn!(run_id = %n.run_id, error = %e, "webhook refused by the egress policy");
                            break;
                        }
                    };
                    let mut req = http
                        .post(&n.url)
                        .header(reqwest::header::CONTENT_TYPE, "application/json")
                        .body(body.clone());
                    if let Some(s) = &secret {
                        // Stamped at each try: a receiver refuses what is too old.
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs());
                        req = req
                            .header(egress::SIGNATURE_HEADER, egress::signature(s, body.as_bytes()))
                            .header(egress::TIMESTAMP_HEADER, now.to_string())
                            .header(
                                egress::TIMED_SIGNATURE_HEADER,
                                egress::timed_signature(s, now, body.as_bytes()),
                            );
                    }
                    match req.send().await {
                        Ok(r) if r.status().is_success() => {
                            delivered = true;
                            break;
                        }
                        Ok(r) => warn!(run_id = %n.run_id, status = r.status().as_u16(), attempt, "webhook refused"),
                        // Without its URL: it may carry a token.
                        Err(e) => warn!(run_id = %n.run_id, error = %e.without_url(), attempt, "webhook failed"),
                    }
                    tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
                }
                if !delivered {
                    // Not the URL: it may carry a token.
                    warn!(run_id = %n.run_id, event = %n.event, "webhook given up after 3 attempts");
                }
                let ack = Command::AckNotifications { keys: vec![key.clone()] };
                if let Err(e) = proposer.propose(system_request(ack)).await {
                    warn!(error = %e, "cannot acknowledge webhook; it may be sent again");
                }
                delivering.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
            });
        }
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;
}

impl Handler<Leadership> for Supervisor {
    type Result = ();
    fn handle(&mut self, msg: Leadership, ctx: &mut Context<Self>) {
        let every = Duration::from_millis(self.config.scheduler.supervise_ms);
        let node = self.node.id;
        let serves_anew = msg.serving && msg != self.gate.leadership;
        if serves_anew {
            // It raises the protocol at once if the voters allow (not a check interval
            // later). A new term's hold counts from now; serving again within the same
            // term (its quorum came back) does not restart it.
            self.last_protocol_check = Instant::now() - PROTOCOL_CHECK_EVERY;
            if self.serving_term != msg.term {
                self.serving_term = msg.term;
                self.serving_since = Instant::now();
            }
        }
        self.gate
            .switch(msg, every, ctx, Self::tick, "supervisor", node);
        if serves_anew {
            // The interval's first tick comes a period later.
            self.tick(ctx);
        }
    }
}

/// Cheap handle to the supervisor.
#[derive(Clone)]
pub struct SupervisorHandle {
    addr: Addr<Supervisor>,
}

impl SupervisorHandle {
    pub(super) fn new(addr: Addr<Supervisor>) -> Self {
        SupervisorHandle { addr }
    }

    /// Tell the actor whether this node is now the serving leader.
    pub fn set_leadership(&self, l: Leadership) {
        self.addr.do_send(l);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::machine::PROTOCOL_VERSION;

    #[test]
    fn at_protocol_1_a_new_leader_expires_nothing_within_a_lease_of_its_term() {
        let lease = Duration::from_secs(3);
        assert!(!may_supervise(1, Duration::ZERO, lease));
        assert!(!may_supervise(1, Duration::from_millis(2_999), lease));
        assert!(may_supervise(1, lease, lease));
        // From protocol 2 apply enforces the same rule itself: no hold.
        assert!(may_supervise(2, Duration::ZERO, lease));
        assert!(may_supervise(PROTOCOL_VERSION, Duration::ZERO, lease));
    }
}

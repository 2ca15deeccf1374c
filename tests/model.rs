//! Model-based property test of the replicated state machine (issue 8, "Upgrades and
//! determinism"): random logs over every command kind — DAG put/pause/delete, trigger,
//! fire window, heartbeat, finish attempt, supervise, purge, cancel, retry, notification
//! acks, protocol raises up to the newest (with tight tenant quotas on client requests and fired
//! windows) — plus membership entries, stale stamps and term changes, applied
//! on three replicas over real RocksDB:
//!
//! - A applies each entry as it comes;
//! - B applies the same log in random apply-call splits;
//! - C falls behind for random stretches and catches up by installing a snapshot built by
//!   a replica that applied every entry, then goes on applying;
//! - D holds an unrelated early state and installs B's final snapshot.
//!
//! Every replica must answer every entry it applied with the same outcomes, and end with
//! the same state digest.

use std::collections::BTreeMap;

use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, EntryPayload, Membership, RaftSnapshotBuilder};
use orchestrator::raft::db::Db;
use orchestrator::raft::state_machine::StateMachineStore;
use orchestrator::raft::types::{Entry, LogId, Member};
use orchestrator::raft::NodeId;
use orchestrator::state::command::{AttemptRef, AttemptResult, Quota, Retention};
use orchestrator::state::machine::{Table, PROTOCOL_VERSION};
use orchestrator::state::model::{DagSpec, RunType, TaskKind, TaskSpec, Window};
use orchestrator::state::{Batch, BatchResponse, Command, IdempotencyKey, Request};
use proptest::prelude::*;

const TENANTS: [&str; 2] = ["t0", "t1"];
const DAGS: [&str; 2] = ["d0", "d1"];

fn spec(dag_id: &str, variant: u8) -> DagSpec {
    let task = |id: &str, deps: &[&str]| TaskSpec {
        task_id: id.into(),
        kind: TaskKind::Noop,
        depends_on: deps.iter().map(|d| d.to_string()).collect(),
        retries: u32::from(variant % 2),
        retry_delay_ms: 50,
        retry_exponential: variant > 1,
        max_retry_delay_ms: 400,
        timeout_ms: None,
    };
    DagSpec {
        dag_id: dag_id.into(),
        schedule: Some("*/5 * * * *".into()),
        timezone: "UTC".into(),
        owner: Some(format!("o{variant}")),
        catchup: variant == 3,
        max_active_runs: 1 + u32::from(variant),
        sla_ms: (variant != 0).then_some(300),
        paused: false,
        start_date_ms: None,
        end_date_ms: None,
        webhook: (variant == 2).then(|| "http://127.0.0.1:1/hook".to_string()),
        tasks: vec![task("a", &[]), {
            // Variant 1's second task runs a command: from protocol 11 it needs the
            // request's shell scope and its version records the grant.
            let mut b = task("b", &["a"]);
            if variant == 1 {
                b.kind = TaskKind::Shell {
                    command: "true".into(),
                };
            }
            b
        }],
    }
}

/// One generated step: a request, or a membership entry.
#[derive(Debug, Clone)]
enum Step {
    Request(Box<Request>),
    Membership(u8),
}

fn window(w: u8) -> Window {
    Window {
        start_ms: i64::from(w) * 300_000,
        end_ms: i64::from(w) * 300_000 + 300_000,
    }
}

fn run_id(n: u8) -> String {
    format!("run_{}", n + 1)
}

fn task(n: u8) -> String {
    ["a", "b"][usize::from(n % 2)].to_string()
}

/// Every command kind over small domains, so that commands meet each other: the same
/// runs, tasks, attempts and nodes come up again and again.
fn arb_command() -> impl Strategy<Value = Command> {
    let t = 0..TENANTS.len();
    let d = 0..DAGS.len();
    prop_oneof![
        3 => (t.clone(), d.clone(), 0u8..4, prop::option::of(0u64..3)).prop_map(|(t, d, v, e)| {
            Command::PutDag {
                tenant: TENANTS[t].into(),
                spec: spec(DAGS[d], v),
                expected_version: e,
            }
        }),
        1 => (t.clone(), d.clone(), any::<bool>()).prop_map(|(t, d, p)| Command::SetPaused {
            tenant: TENANTS[t].into(),
            dag_id: DAGS[d].into(),
            paused: p,
        }),
        1 => (t.clone(), d.clone()).prop_map(|(t, d)| Command::DeleteDag {
            tenant: TENANTS[t].into(),
            dag_id: DAGS[d].into(),
        }),
        3 => (t.clone(), d.clone(), 0u8..5, 0u8..3).prop_map(|(t, d, w, k)| Command::TriggerRun {
            tenant: TENANTS[t].into(),
            dag_id: DAGS[d].into(),
            run_type: [RunType::Manual, RunType::Backfill, RunType::Scheduled][usize::from(k)],
            window: window(w),
        }),
        3 => (t.clone(), d.clone(), 0u8..6, 1u64..4).prop_map(|(t, d, w, term)| Command::FireWindow {
            tenant: TENANTS[t].into(),
            dag_id: DAGS[d].into(),
            window: window(w),
            term,
        }),
        4 => (1u64..4, 0u8..2, prop::collection::vec((0u8..6, 0u8..2, 1u32..4), 0..3))
            .prop_map(|(node, inc, running)| Command::Heartbeat {
                node,
                incarnation: format!("i{inc}"),
                slots: 2,
                running: running
                    .into_iter()
                    .map(|(r, k, a)| AttemptRef { run_id: run_id(r), task_id: task(k), attempt: a })
                    .collect(),
                lease_ms: 1_000,
            }),
        5 => (0u8..6, 0u8..2, 1u32..4, 1u64..4, 0u8..4).prop_map(|(r, k, a, node, res)| {
            Command::FinishAttempt {
                attempt: AttemptRef { run_id: run_id(r), task_id: task(k), attempt: a },
                node,
                result: match res {
                    0 => AttemptResult::Success { exit_code: Some(0) },
                    1 => AttemptResult::Failed { exit_code: Some(1), error: "boom".into() },
                    2 => AttemptResult::TimedOut { error: "slow".into() },
                    _ => AttemptResult::Lost { error: "gone".into() },
                },
            }
        }),
        3 => (1u64..4).prop_map(|term| Command::Supervise { term }),
        1 => (1u64..4, 0i64..2_000_000, any::<bool>()).prop_map(|(term, cut, keep)| Command::Purge {
            term,
            before_ms: cut,
            records_before_ms: cut / 2,
            keep: keep.then_some(Retention { runs_ms: 5_000, records_ms: 20_000 }),
        }),
        1 => (t.clone(), 0u8..6).prop_map(|(t, r)| Command::CancelRun {
            tenant: TENANTS[t].into(),
            run_id: run_id(r),
        }),
        1 => (t, 0u8..6).prop_map(|(t, r)| Command::RetryRun {
            tenant: TENANTS[t].into(),
            run_id: run_id(r),
        }),
        1 => (0u8..6).prop_map(|r| Command::AckNotifications {
            keys: vec![format!("{}\0failure", run_id(r)), format!("{}\0success", run_id(r))],
        }),
        1 => (1u64..4, 2u32..=PROTOCOL_VERSION).prop_map(|(term, version)| Command::RaiseProtocol { term, version }),
    ]
}

/// Tight quotas (protocol 5 enforces them in apply), so refusals and dropped versions
/// happen often: the counts they read must be the same on a replica that kept them as it
/// applied and on one that rebuilt them from a snapshot.
fn arb_quota() -> impl Strategy<Value = Quota> {
    let share = prop_oneof![Just(None), (1u32..=100).prop_map(Some)];
    (1u64..3, 1u64..5, 1u64..4, 1u64..4, share).prop_map(|(dags, active, queued, kept, share)| {
        Quota {
            max_dags: dags,
            max_active_runs: active,
            max_queued_runs_per_dag: queued,
            dag_versions_kept: kept,
            slot_share_percent: share,
        }
    })
}

fn arb_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        30 => (arb_command(), 0u8..8, 0u8..4, -3i64..40, prop::option::of(arb_quota())).prop_map(|(command, rid, idem, dt, quota)| {
            // A few request ids repeat (retries); stamps mostly advance, some go back.
            Step::Request(Box::new(Request {
                request_id: format!("r{rid}-{}", command_tag(&command)),
                proposed_at_ms: dt,
                idempotency: (idem > 0 && is_client(&command)).then(|| IdempotencyKey {
                    tenant: "t0".into(),
                    key: format!("k{idem}"),
                    fingerprint: command_tag(&command).into(),
                }),
                quota: quota.filter(|_| is_client(&command) || command_tag(&command) == "fire"),
                command,
                subject: None,
                // Some client writes come without the shell scope.
                shell_scope: rid % 3 != 0,
            }))
        }),
        1 => (1u8..4).prop_map(Step::Membership),
    ]
}

fn command_tag(c: &Command) -> &'static str {
    match c {
        Command::PutDag { .. } => "put",
        Command::SetPaused { .. } => "pause",
        Command::DeleteDag { .. } => "delete",
        Command::TriggerRun { .. } => "trigger",
        Command::FireWindow { .. } => "fire",
        Command::Heartbeat { .. } => "heartbeat",
        Command::FinishAttempt { .. } => "finish",
        Command::Supervise { .. } => "supervise",
        Command::Purge { .. } => "purge",
        Command::CancelRun { .. } => "cancel",
        Command::RetryRun { .. } => "retry",
        Command::AckNotifications { .. } => "ack",
        Command::RaiseProtocol { .. } => "raise",
    }
}

fn is_client(c: &Command) -> bool {
    matches!(
        c,
        Command::PutDag { .. }
            | Command::TriggerRun { .. }
            | Command::SetPaused { .. }
            | Command::DeleteDag { .. }
            | Command::CancelRun { .. }
            | Command::RetryRun { .. }
    )
}

fn member(id: NodeId) -> Member {
    Member {
        api_addr: format!("127.0.0.1:{}", 8080 + id),
        peer_addr: format!("127.0.0.1:{}", 9080 + id),
        disk: None,
    }
}

/// Turn steps into log entries, after one that raises the protocol to `start`: requests
/// grouped 1-3 to an entry, terms rising now and
/// then (so fenced commands are sometimes stale), stamps as running sums of the deltas.
fn entries(steps: &[Step], groups: &[u8], term_bumps: &[bool], start: u32) -> Vec<Entry> {
    let (mut term, mut clock, mut i, mut g) = (1u64, 1_000_000i64, 0usize, 0usize);
    // The log starts at protocol `start` (1: no raise), so every protocol's apply runs long.
    let raise = Request {
        request_id: "start".into(),
        proposed_at_ms: clock,
        idempotency: None,
        command: Command::RaiseProtocol {
            term,
            version: start,
        },
        subject: None,
        quota: None,
        shell_scope: false,
    };
    let mut out = vec![Entry {
        log_id: LogId::new(CommittedLeaderId::new(term, 1), 1),
        payload: EntryPayload::Normal(Batch {
            requests: if start > 1 { vec![raise] } else { Vec::new() },
        }),
    }];
    while i < steps.len() {
        if term_bumps.get(out.len()).copied().unwrap_or(false) {
            term += 1;
        }
        let log_id = LogId::new(CommittedLeaderId::new(term, 1), out.len() as u64 + 1);
        if let Step::Membership(n) = &steps[i] {
            let voters: std::collections::BTreeSet<NodeId> = (1..=u64::from(*n)).collect();
            let nodes: BTreeMap<NodeId, Member> = (1..=3).map(|id| (id, member(id))).collect();
            let m = Membership::new(vec![voters], nodes);
            out.push(Entry {
                log_id,
                payload: EntryPayload::Membership(m),
            });
            i += 1;
            continue;
        }
        let size = usize::from(groups.get(g).copied().unwrap_or(1)).clamp(1, 3);
        g += 1;
        let mut requests = Vec::new();
        while requests.len() < size && i < steps.len() {
            match &steps[i] {
                Step::Request(r) => {
                    let mut r = Request::clone(r);
                    clock += r.proposed_at_ms * 100;
                    r.proposed_at_ms = clock;
                    requests.push(r);
                    i += 1;
                }
                Step::Membership(_) => break,
            }
        }
        out.push(Entry {
            log_id,
            payload: EntryPayload::Normal(Batch { requests }),
        });
    }
    out
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

struct Replica {
    _dir: tempfile::TempDir,
    db: Db,
    sm: StateMachineStore,
}

fn replica() -> Replica {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = Db::open(dir.path()).expect("open db");
    let sm = StateMachineStore::new(db.clone()).expect("open state machine");
    Replica { _dir: dir, db, sm }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, failure_persistence: None, .. ProptestConfig::default() })]

    #[test]
    fn replicas_agree_on_every_command_through_snapshots(
        steps in prop::collection::vec(arb_step(), 1..90),
        groups in prop::collection::vec(1u8..4, 0..90),
        term_bumps in prop::collection::vec(prop::bool::weighted(0.08), 0..90),
        splits in prop::collection::vec(1usize..6, 1..30),
        snapshot_at in prop::collection::vec(prop::bool::weighted(0.1), 0..90),
        lag_from in prop::collection::vec(prop::bool::weighted(0.1), 0..90),
        start in 1u32..=PROTOCOL_VERSION,
    ) {
        let log = entries(&steps, &groups, &term_bumps, start);
        let rt = rt();
        let (mut a, mut b, mut c) = (replica(), replica(), replica());
        rt.block_on(async {
            // A: one apply call per entry.
            let mut answers_a: Vec<BatchResponse> = Vec::new();
            for e in &log {
                answers_a.extend(a.sm.apply(vec![e.clone()]).await.expect("apply A"));
            }
            // B: the same log, in other apply-call splits.
            let mut answers_b = Vec::new();
            let (mut at, mut k) = (0usize, 0usize);
            while at < log.len() {
                let n = splits[k % splits.len()].min(log.len() - at);
                answers_b.extend(b.sm.apply(log[at..at + n].to_vec()).await.expect("apply B"));
                at += n;
                k += 1;
            }
            prop_assert_eq!(&answers_a, &answers_b, "A and B answer alike");
            prop_assert_eq!(a.db.state_digest().expect("digest A"), b.db.state_digest().expect("digest B"));

            // C: a follower that falls behind for random stretches (applies nothing) and
            // catches up by installing the snapshot of A' (a replica that applied every
            // entry so far), as a lagging follower does; then it applies on.
            let mut a2 = replica();
            let mut behind = false;
            for (i, e) in log.iter().enumerate() {
                if i > 0 && snapshot_at.get(i).copied().unwrap_or(false) {
                    let snap = a2.sm.build_snapshot().await.expect("build snapshot");
                    c.sm.install_snapshot(&snap.meta, snap.snapshot).await.expect("install");
                    prop_assert_eq!(
                        a2.db.state_digest().expect("digest A'"),
                        c.db.state_digest().expect("digest C"),
                        "C equals A' right after installing at entry {}", i
                    );
                    behind = false;
                }
                let want = a2.sm.apply(vec![e.clone()]).await.expect("apply A'");
                if lag_from.get(i).copied().unwrap_or(false) {
                    behind = true;
                }
                if !behind {
                    let got = c.sm.apply(vec![e.clone()]).await.expect("apply C");
                    prop_assert_eq!(&got, &want, "C answers entry {} like A", i);
                }
            }
            if behind {
                let snap = a2.sm.build_snapshot().await.expect("build snapshot");
                c.sm.install_snapshot(&snap.meta, snap.snapshot).await.expect("install");
            }
            prop_assert_eq!(a.db.state_digest().expect("digest A"), c.db.state_digest().expect("digest C"));
            // And B's snapshot of the final state, installed on a replica that holds an
            // unrelated early state, gives the same state too.
            let mut d = replica();
            d.sm.apply(log[..log.len().min(3)].to_vec()).await.expect("apply D");
            let snap = b.sm.build_snapshot().await.expect("build snapshot B");
            d.sm.install_snapshot(&snap.meta, snap.snapshot).await.expect("install D");
            prop_assert_eq!(a.db.state_digest().expect("digest A"), d.db.state_digest().expect("digest D"));
            // What each replica kept as it applied (the counts quotas read, the census)
            // equals what a node counts afresh from the same state when it starts.
            for (name, r) in [("A", &a), ("B", &b), ("C", &c), ("D", &d)] {
                let fresh = StateMachineStore::new(r.db.clone()).expect("reopen");
                let kept = r.sm.tenant_counts().clone();
                prop_assert_eq!(&kept, &*fresh.tenant_counts(), "{} tenant counts", name);
                prop_assert_eq!(r.sm.census(), fresh.census(), "{} census", name);
                // The running tasks the fair share counts (protocol 8) are the assignments.
                let running = r.sm.running_attempts();
                prop_assert_eq!(&running, &fresh.running_attempts(), "{} running tasks", name);
                let assigned = r
                    .db
                    .scan_prefix(Table::Assignments, b"", None, usize::MAX)
                    .expect("scan assignments")
                    .len();
                prop_assert_eq!(running.values().sum::<u32>() as usize, assigned, "{} assignments", name);
            }
            Ok(())
        })?;
    }
}

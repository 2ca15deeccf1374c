//! Unit tests of apply over an in-memory [`Kv`] (`MemKv`, also used by the model test).

use std::collections::BTreeMap;

use super::*;
use crate::state::command::{AttemptRef, Retention};
use crate::state::model::{TaskKind, TaskSpec};

/// An in-memory [`Kv`] for unit tests of the pure apply logic.
#[derive(Default, Debug, PartialEq, Eq)]
pub struct MemKv(pub BTreeMap<(Table, Vec<u8>), Vec<u8>>);

impl Kv for MemKv {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.0.get(&(table, key.to_vec())).cloned())
    }
    fn put(&mut self, table: Table, key: Vec<u8>, value: Vec<u8>) {
        self.0.insert((table, key), value);
    }
    fn delete(&mut self, table: Table, key: Vec<u8>) {
        self.0.remove(&(table, key));
    }
    fn scan_prefix(&self, table: Table, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, KvError> {
        Ok(self
            .0
            .range((table, prefix.to_vec())..)
            .take_while(|((t, k), _)| *t == table && k.starts_with(prefix))
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect())
    }
}

pub fn spec(dag_id: &str) -> DagSpec {
    DagSpec {
        dag_id: dag_id.into(),
        schedule: Some("0 2 * * *".into()),
        timezone: "UTC".into(),
        owner: Some("team-data".into()),
        catchup: false,
        max_active_runs: 16,
        sla_ms: Some(60_000),
        paused: false,
        start_date_ms: None,
        end_date_ms: None,
        webhook: None,
        tasks: vec![TaskSpec {
            task_id: "extract".into(),
            kind: TaskKind::Noop,
            depends_on: vec![],
            retries: 0,
            retry_delay_ms: 1000,
            retry_exponential: false,
            max_retry_delay_ms: 60_000,
            timeout_ms: None,
        }],
    }
}

fn apply(kv: &mut MemKv, r: &Request) -> Result<Response, KvError> {
    apply_request(kv, r, 1)
}

pub fn req(id: &str, now: Millis, command: Command) -> Request {
    Request {
        request_id: id.into(),
        proposed_at_ms: now,
        idempotency: None,
        command,
        subject: None,
        quota: None,
        shell_scope: false,
    }
}

fn put(tenant: &str, dag: &str, expected: Option<u64>) -> Command {
    Command::PutDag {
        tenant: tenant.into(),
        spec: spec(dag),
        expected_version: expected,
    }
}

fn trigger(tenant: &str, dag: &str, start: i64, end: i64) -> Command {
    Command::TriggerRun {
        tenant: tenant.into(),
        dag_id: dag.into(),
        run_type: RunType::Backfill,
        window: Window {
            start_ms: start,
            end_ms: end,
        },
    }
}

#[test]
fn same_window_returns_the_same_run() {
    let mut kv = MemKv::default();
    apply(&mut kv, &req("r1", 1, put("t", "d", None))).unwrap();
    let a = apply(&mut kv, &req("r2", 2, trigger("t", "d", 0, 10))).unwrap();
    let b = apply(&mut kv, &req("r3", 3, trigger("t", "d", 0, 10))).unwrap();
    let c = apply(&mut kv, &req("r4", 4, trigger("t", "d", 10, 20))).unwrap();
    let id = |r: &Response| match &r.outcome {
        Outcome::RunTriggered {
            run_id, existed, ..
        } => (run_id.clone(), *existed),
        o => panic!("unexpected {o:?}"),
    };
    assert_eq!(id(&a), ("run_1".to_string(), false));
    assert_eq!(id(&b), ("run_1".to_string(), true));
    assert_eq!(id(&c), ("run_2".to_string(), false));
}

#[test]
fn a_retried_request_id_is_answered_not_reapplied() {
    let mut kv = MemKv::default();
    apply(&mut kv, &req("r1", 1, put("t", "d", None))).unwrap();
    let first = apply(&mut kv, &req("same", 2, trigger("t", "d", 0, 10))).unwrap();
    let mut changed = spec("d");
    changed.owner = Some("other".into());
    // Same id with another command: the stored answer wins, nothing is applied.
    let retry = apply(
        &mut kv,
        &req(
            "same",
            3,
            Command::PutDag {
                tenant: "t".into(),
                spec: changed,
                expected_version: None,
            },
        ),
    )
    .unwrap();
    assert!(retry.replayed);
    assert_eq!(retry.outcome, first.outcome);
}

#[test]
fn version_guard_and_unchanged_put() {
    let mut kv = MemKv::default();
    let v1 = apply(&mut kv, &req("a", 1, put("t", "d", Some(0)))).unwrap();
    assert!(matches!(
        v1.outcome,
        Outcome::DagPut {
            version: 1,
            changed: true,
            ..
        }
    ));
    let same = apply(&mut kv, &req("b", 2, put("t", "d", None))).unwrap();
    assert!(matches!(
        same.outcome,
        Outcome::DagPut {
            version: 1,
            changed: false,
            ..
        }
    ));
    let stale = apply(&mut kv, &req("c", 3, put("t", "d", Some(7)))).unwrap();
    assert_eq!(
        stale.outcome,
        Outcome::VersionConflict {
            expected: 7,
            current: 1
        }
    );
}

#[test]
fn tenants_do_not_share_dags() {
    let mut kv = MemKv::default();
    apply(&mut kv, &req("a", 1, put("t1", "d", None))).unwrap();
    let r = apply(&mut kv, &req("b", 2, trigger("t2", "d", 0, 1))).unwrap();
    assert!(matches!(r.outcome, Outcome::NotFound { .. }));
}

#[test]
fn idempotency_key_replays_or_rejects() {
    let mut kv = MemKv::default();
    apply(&mut kv, &req("a", 1, put("t", "d", None))).unwrap();
    let with_key = |id: &str, fp: &str, start: i64| Request {
        request_id: id.into(),
        proposed_at_ms: 5,
        idempotency: Some(IdempotencyKey {
            tenant: "t".into(),
            key: "k1".into(),
            fingerprint: fp.into(),
        }),
        command: trigger("t", "d", start, start + 1),
        subject: None,
        quota: None,
        shell_scope: false,
    };
    let first = apply(&mut kv, &with_key("x1", "f1", 0)).unwrap();
    let replay = apply(&mut kv, &with_key("x2", "f1", 0)).unwrap();
    assert!(replay.replayed);
    assert_eq!(replay.outcome, first.outcome);
    let reused = apply(&mut kv, &with_key("x3", "f2", 100)).unwrap();
    assert!(matches!(
        reused.outcome,
        Outcome::IdempotencyKeyReused { .. }
    ));
}

#[test]
fn from_protocol_4_manual_triggers_without_a_window_are_new_runs() {
    let manual = |window: Option<(i64, i64)>| Command::TriggerRun {
        tenant: "t".into(),
        dag_id: "d".into(),
        run_type: RunType::Manual,
        // The API sends a manual run without a window as [now, now] of its clock.
        window: window.map_or(
            Window {
                start_ms: 7,
                end_ms: 7,
            },
            |(s, e)| Window {
                start_ms: s,
                end_ms: e,
            },
        ),
    };
    let run_id = |r: Response| match r.outcome {
        Outcome::RunTriggered {
            run_id, existed, ..
        } => (run_id, existed),
        other => panic!("{other:?}"),
    };
    for protocol in [3, 4] {
        let mut kv = MemKv::default();
        let raise = Command::RaiseProtocol {
            term: 1,
            version: protocol,
        };
        apply(&mut kv, &req("raise", 0, raise)).unwrap();
        apply(&mut kv, &req("a", 1, put("t", "d", None))).unwrap();
        // Two triggers stamped in the same millisecond.
        let (first, _) = run_id(apply(&mut kv, &req("m1", 7, manual(None))).unwrap());
        let (second, existed) = run_id(apply(&mut kv, &req("m2", 7, manual(None))).unwrap());
        if protocol < 4 {
            assert_eq!(
                (&first, existed),
                (&second, true),
                "protocol 3 shared the run"
            );
            continue;
        }
        assert_ne!(first, second, "two manual triggers, two runs");
        assert!(!existed);
        // A retry of the same request is still answered from its record.
        let (again, _) = run_id(apply(&mut kv, &req("m2", 8, manual(None))).unwrap());
        assert_eq!(again, second);
        // Each run's window is the cluster time it was applied at.
        assert_eq!(run(&kv, &second).window.start_ms, 7);
        // A manual run with a window is still one run per window.
        let (w1, _) = run_id(apply(&mut kv, &req("w1", 9, manual(Some((0, 10))))).unwrap());
        let (w2, existed) = run_id(apply(&mut kv, &req("w2", 9, manual(Some((0, 10))))).unwrap());
        assert_eq!((w1, existed), (w2, true));
    }
}

/// An empty state raised to `protocol`.
fn at_protocol(protocol: u32) -> MemKv {
    let mut kv = MemKv::default();
    let raise = Command::RaiseProtocol {
        term: 1,
        version: protocol,
    };
    apply(&mut kv, &req("raise", 0, raise)).unwrap();
    kv
}

/// `r` carrying `quota`, as the API and the scheduler send it.
fn with_quota(mut r: Request, quota: Quota) -> Request {
    r.quota = Some(quota);
    r
}

const QUOTA: Quota = Quota {
    max_dags: 2,
    max_active_runs: 100,
    max_queued_runs_per_dag: 2,
    dag_versions_kept: 2,
    slot_share_percent: None,
};

#[test]
fn from_protocol_5_apply_holds_each_quota_counting_the_writes_before_it() {
    let windowless = || Command::TriggerRun {
        tenant: "t".into(),
        dag_id: "d".into(),
        run_type: RunType::Manual,
        window: Window {
            start_ms: 7,
            end_ms: 7,
        },
    };
    for protocol in [4, 5] {
        let mut kv = at_protocol(protocol);
        let mut one_at_a_time = spec("d");
        one_at_a_time.max_active_runs = 1;
        let put_d = Command::PutDag {
            tenant: "t".into(),
            spec: one_at_a_time,
            expected_version: None,
        };
        apply(&mut kv, &with_quota(req("p", 1, put_d), QUOTA)).unwrap();
        // One run starts, two queue, the fourth is one queued run too many.
        let outcomes: Vec<Outcome> = (0..4)
            .map(|i| {
                let r = with_quota(req(&format!("m{i}"), 10 + i, windowless()), QUOTA);
                apply(&mut kv, &r).unwrap().outcome
            })
            .collect();
        let refused = |o: &Outcome| matches!(o, Outcome::QuotaExceeded { .. });
        if protocol < 5 {
            assert!(!outcomes.iter().any(refused), "protocol 4 enforces nothing");
            continue;
        }
        assert!(!outcomes[..3].iter().any(refused), "{outcomes:?}");
        match &outcomes[3] {
            Outcome::QuotaExceeded { message } => {
                assert!(message.contains("max_queued_runs_per_dag = 2"), "{message}")
            }
            o => panic!("the third queued run was let in: {o:?}"),
        }
        // The refused trigger's X-Request-Id stays free: the same key applies once
        // there is room (a refusal is "not now", not the key's answer).
        let mut keyed = with_quota(req("k1", 15, windowless()), QUOTA);
        keyed.idempotency = Some(IdempotencyKey {
            tenant: "t".into(),
            key: "retry-me".into(),
            fingerprint: "f".into(),
        });
        let o = apply(&mut kv, &keyed).unwrap();
        assert!(refused(&o.outcome), "{o:?}");
        let cancel = Command::CancelRun {
            tenant: "t".into(),
            run_id: "run_2".into(),
        };
        apply(&mut kv, &req("c0", 16, cancel)).unwrap();
        keyed.request_id = "k2".into();
        let o = apply(&mut kv, &keyed).unwrap();
        assert!(
            matches!(o.outcome, Outcome::RunTriggered { .. }) && !o.replayed,
            "the retry with the same key is applied: {o:?}"
        );
        // A refused window leaves the cursor where it was, and fires once there is room.
        let fire = Command::FireWindow {
            tenant: "t".into(),
            dag_id: "d".into(),
            window: Window {
                start_ms: 0,
                end_ms: 86_400_000,
            },
            term: 1,
        };
        let o = apply(&mut kv, &with_quota(req("f1", 20, fire.clone()), QUOTA)).unwrap();
        assert!(refused(&o.outcome), "{o:?}");
        assert_eq!(kv.get(Table::Cursors, &keys::dag("t", "d")).unwrap(), None);
        let cancel = Command::CancelRun {
            tenant: "t".into(),
            run_id: "run_3".into(),
        };
        apply(&mut kv, &req("c", 21, cancel)).unwrap();
        let o = apply(&mut kv, &with_quota(req("f2", 22, fire), QUOTA)).unwrap();
        assert!(
            matches!(o.outcome, Outcome::Fired { created: true, .. }),
            "{o:?}"
        );
        // DAGs: a third is refused; updating one of the two is not.
        let put = |dag: &str, owner: &str| {
            let mut s = spec(dag);
            s.owner = Some(owner.into());
            Command::PutDag {
                tenant: "t".into(),
                spec: s,
                expected_version: None,
            }
        };
        let mut o = |id: &str, c| apply(&mut kv, &with_quota(req(id, 30, c), QUOTA)).unwrap();
        assert!(matches!(
            o("e", put("e", "a")).outcome,
            Outcome::DagPut { .. }
        ));
        match o("x", put("x", "a")).outcome {
            Outcome::QuotaExceeded { message } => {
                assert!(message.contains("max_dags_per_tenant = 2"), "{message}")
            }
            other => panic!("a third DAG was let in: {other:?}"),
        }
        assert!(matches!(
            o("e2", put("e", "b")).outcome,
            Outcome::DagPut { .. }
        ));
        // Another tenant has its own count.
        let other = Command::PutDag {
            tenant: "u".into(),
            spec: spec("x"),
            expected_version: None,
        };
        assert!(matches!(o("u", other).outcome, Outcome::DagPut { .. }));
    }
}

/// The versions of tenant `t`'s DAG `dag` kept in the state.
fn stored_versions(kv: &MemKv, dag: &str) -> Vec<u64> {
    let prefix = keys::prefix(&[b"t", dag.as_bytes()]);
    kv.scan_prefix(Table::DagVersions, &prefix)
        .unwrap()
        .iter()
        .filter_map(|(k, _)| version_of_key(&prefix, k))
        .collect()
}

#[test]
fn from_protocol_5_old_versions_go_except_those_unfinished_runs_execute() {
    let versions = |kv: &MemKv| stored_versions(kv, "d");
    for protocol in [4, 5] {
        let mut kv = at_protocol(protocol);
        let mut n = 0;
        let mut new_version = |kv: &mut MemKv| {
            n += 1;
            let mut s = spec("d");
            s.owner = Some(format!("owner-{n}"));
            let put = Command::PutDag {
                tenant: "t".into(),
                spec: s,
                expected_version: None,
            };
            let o = apply(kv, &with_quota(req(&format!("v{n}"), n, put), QUOTA)).unwrap();
            assert!(matches!(o.outcome, Outcome::DagPut { .. }), "{o:?}");
        };
        new_version(&mut kv);
        // A run of version 1 is still running while versions 2, 3 and 4 are written.
        let o = apply(&mut kv, &req("run", 10, trigger("t", "d", 0, 10))).unwrap();
        assert!(matches!(o.outcome, Outcome::RunTriggered { .. }), "{o:?}");
        for _ in 0..3 {
            new_version(&mut kv);
        }
        if protocol < 5 {
            assert_eq!(versions(&kv), vec![1, 2, 3, 4], "protocol 4 keeps all");
            continue;
        }
        assert_eq!(versions(&kv), vec![1, 3, 4], "version 1 is in use");
        let cancel = Command::CancelRun {
            tenant: "t".into(),
            run_id: "run_1".into(),
        };
        apply(&mut kv, &req("c", 20, cancel)).unwrap();
        // Pausing writes a version too.
        let pause = Command::SetPaused {
            tenant: "t".into(),
            dag_id: "d".into(),
            paused: true,
        };
        apply(&mut kv, &with_quota(req("pause", 21, pause), QUOTA)).unwrap();
        assert_eq!(versions(&kv), vec![4, 5]);
        // The finished run's version is gone: a retry says so instead of failing apply.
        let retry = Command::RetryRun {
            tenant: "t".into(),
            run_id: "run_1".into(),
        };
        match apply(&mut kv, &req("retry", 22, retry)).unwrap().outcome {
            Outcome::InvalidState { message } => {
                assert!(message.contains("max_dag_versions"), "{message}")
            }
            o => panic!("{o:?}"),
        }
    }
}

#[test]
fn from_protocol_7_a_deleted_dag_keeps_only_what_unfinished_runs_need() {
    let tombstone = |kv: &MemKv, dag: &str| -> Dag {
        get_json::<Dag>(kv, Table::Dags, &keys::dag("t", dag))
            .unwrap()
            .expect("the deleted DAG's record")
    };
    let delete = |dag: &str| Command::DeleteDag {
        tenant: "t".into(),
        dag_id: dag.into(),
    };
    for protocol in [6, 7] {
        let mut kv = at_protocol(protocol);
        // "idle": three versions, no run. "busy": two versions, a run of version 1 left
        // unfinished.
        for (i, dag) in ["idle", "idle", "idle", "busy"].iter().enumerate() {
            let mut s = spec(dag);
            s.owner = Some(format!("owner-{i}"));
            s.webhook = Some("https://hooks.example/x".into());
            let write = Command::PutDag {
                tenant: "t".into(),
                spec: s,
                expected_version: None,
            };
            apply(&mut kv, &req(&format!("p{i}"), i as i64, write)).unwrap();
        }
        let o = apply(&mut kv, &req("run", 10, trigger("t", "busy", 0, 10))).unwrap();
        assert!(matches!(o.outcome, Outcome::RunTriggered { .. }), "{o:?}");
        let mut s = spec("busy");
        s.owner = Some("second".into());
        let second = Command::PutDag {
            tenant: "t".into(),
            spec: s,
            expected_version: None,
        };
        apply(&mut kv, &req("p-busy-2", 11, second)).unwrap();
        apply(&mut kv, &req("d1", 12, delete("idle"))).unwrap();
        apply(&mut kv, &req("d2", 13, delete("busy"))).unwrap();
        if protocol < 7 {
            assert_eq!(
                stored_versions(&kv, "idle"),
                vec![1, 2, 3],
                "protocol 6 keeps all"
            );
            assert!(!tombstone(&kv, "idle").spec.tasks.is_empty());
            continue;
        }
        assert_eq!(stored_versions(&kv, "idle"), Vec::<u64>::new());
        assert_eq!(
            stored_versions(&kv, "busy"),
            vec![1],
            "the unfinished run's version stays"
        );
        for dag in ["idle", "busy"] {
            let t = tombstone(&kv, dag);
            assert!(t.deleted);
            assert!(t.spec.tasks.is_empty() && t.spec.webhook.is_none() && t.spec.owner.is_none());
        }
        // The unfinished run still runs its version to the end.
        let run = get_json::<Run>(&kv, Table::Runs, b"run_1")
            .unwrap()
            .expect("run");
        assert_eq!(run.dag_version, 1);
        assert_eq!(run_spec(&kv, &run).unwrap().tasks.len(), 1);
        // When that run finishes, the version goes with it; the run cannot be retried.
        let cancel = Command::CancelRun {
            tenant: "t".into(),
            run_id: "run_1".into(),
        };
        apply(&mut kv, &req("c", 15, cancel)).unwrap();
        assert_eq!(stored_versions(&kv, "busy"), Vec::<u64>::new());
        let retry = Command::RetryRun {
            tenant: "t".into(),
            run_id: "run_1".into(),
        };
        match apply(&mut kv, &req("retry", 16, retry)).unwrap().outcome {
            Outcome::InvalidState { message } => assert!(message.contains("deleted"), "{message}"),
            o => panic!("{o:?}"),
        }
        // Re-created, the DAG goes on from the next version number.
        let o = apply(&mut kv, &req("again", 20, put("t", "idle", None))).unwrap();
        assert!(
            matches!(&o.outcome, Outcome::DagPut { version: 4, .. }),
            "{o:?}"
        );
    }
}

fn chain_spec(dag_id: &str, n: usize, retries: u32) -> DagSpec {
    let mut s = spec(dag_id);
    s.sla_ms = None;
    s.max_active_runs = 1;
    s.tasks = (0..n)
        .map(|i| TaskSpec {
            task_id: format!("t{i}"),
            kind: TaskKind::Noop,
            depends_on: if i == 0 {
                vec![]
            } else {
                vec![format!("t{}", i - 1)]
            },
            retries,
            retry_delay_ms: 100,
            retry_exponential: false,
            max_retry_delay_ms: 1000,
            timeout_ms: None,
        })
        .collect();
    s
}

fn heartbeat(node: u64, now: Millis) -> Request {
    req(
        &format!("hb{node}-{now}"),
        now,
        Command::Heartbeat {
            node,
            incarnation: "i1".into(),
            slots: 2,
            running: vec![],
            lease_ms: 1000,
        },
    )
}

fn run(kv: &MemKv, id: &str) -> Run {
    get_json::<Run>(kv, Table::Runs, id.as_bytes())
        .unwrap()
        .unwrap()
}

fn finish(
    kv: &mut MemKv,
    now: Millis,
    run_id: &str,
    task: &str,
    attempt: u32,
    node: u64,
    ok: bool,
) -> Outcome {
    let result = if ok {
        AttemptResult::Success { exit_code: Some(0) }
    } else {
        AttemptResult::Failed {
            exit_code: Some(1),
            error: "boom".into(),
        }
    };
    let cmd = Command::FinishAttempt {
        attempt: AttemptRef {
            run_id: run_id.into(),
            task_id: task.into(),
            attempt,
        },
        node,
        result,
    };
    apply(kv, &req(&format!("f{now}"), now, cmd))
        .unwrap()
        .outcome
}

fn setup_chain(n: usize, retries: u32) -> (MemKv, String) {
    let mut kv = MemKv::default();
    apply(&mut kv, &heartbeat(1, 0)).unwrap();
    let put = Command::PutDag {
        tenant: "t".into(),
        spec: chain_spec("c", n, retries),
        expected_version: None,
    };
    apply(&mut kv, &req("p", 0, put)).unwrap();
    let r = apply(&mut kv, &req("r", 1, trigger("t", "c", 0, 10))).unwrap();
    let Outcome::RunTriggered { run_id, .. } = r.outcome else {
        panic!("{r:?}")
    };
    (kv, run_id)
}

/// Ten independent tasks.
fn wide_spec(dag_id: &str) -> DagSpec {
    let mut s = chain_spec(dag_id, 10, 0);
    for t in &mut s.tasks {
        t.depends_on.clear();
    }
    s
}

fn running_tasks(kv: &MemKv, id: &str) -> usize {
    run(kv, id)
        .tasks
        .values()
        .filter(|t| t.state == TaskState::Running)
        .count()
}

#[test]
fn from_protocol_3_a_tenant_cannot_hold_every_slot_while_another_waits() {
    for protocol in [2, 3] {
        let mut kv = MemKv::default();
        let raise = Command::RaiseProtocol {
            term: 1,
            version: protocol,
        };
        apply(&mut kv, &req("raise", 0, raise)).unwrap();
        let hb = Command::Heartbeat {
            node: 1,
            incarnation: "i1".into(),
            slots: 4,
            running: vec![],
            lease_ms: 10_000,
        };
        apply(&mut kv, &req("hb", 0, hb)).unwrap();
        let mut runs = Vec::new();
        for tenant in ["a", "b"] {
            let put = Command::PutDag {
                tenant: tenant.into(),
                spec: wide_spec("w"),
                expected_version: None,
            };
            apply(&mut kv, &req(&format!("p{tenant}"), 0, put)).unwrap();
            let r = apply(
                &mut kv,
                &req(&format!("t{tenant}"), 1, trigger(tenant, "w", 0, 10)),
            )
            .unwrap();
            let Outcome::RunTriggered { run_id, .. } = r.outcome else {
                panic!("{r:?}")
            };
            runs.push(run_id);
        }
        let (a, b) = (&runs[0], &runs[1]);
        // Tenant a came first and took every slot.
        assert_eq!(running_tasks(&kv, a), 4, "protocol {protocol}");
        assert_eq!(running_tasks(&kv, b), 0, "protocol {protocol}");
        finish(&mut kv, 2, a, "t0", 1, 1, true);
        finish(&mut kv, 3, a, "t1", 1, 1, true);
        apply(&mut kv, &req("sup", 4, Command::Supervise { term: 1 })).unwrap();
        let (ra, rb) = (running_tasks(&kv, a), running_tasks(&kv, b));
        if protocol < 3 {
            // Before: a's freed slots went straight back to a; b starves.
            assert_eq!((ra, rb), (4, 0));
        } else {
            assert_eq!((ra, rb), (2, 2), "each tenant holds half of the 4 slots");
            // When b has nothing left to run, a gets the slots back (work-conserving).
            let cancel = Command::CancelRun {
                tenant: "b".into(),
                run_id: b.clone(),
            };
            apply(&mut kv, &req("cancel", 5, cancel)).unwrap();
            apply(&mut kv, &req("sup2", 6, Command::Supervise { term: 1 })).unwrap();
            assert_eq!(running_tasks(&kv, a), 4);
        }
    }
}

#[test]
fn a_chain_runs_task_by_task_to_done() {
    let (mut kv, id) = setup_chain(3, 0);
    assert_eq!(run(&kv, &id).state, RunState::Running);
    for (i, now) in [(0, 2), (1, 3), (2, 4)] {
        let t = format!("t{i}");
        assert_eq!(
            run(&kv, &id).tasks[&t].state,
            TaskState::Running,
            "t{i} assigned"
        );
        let o = finish(&mut kv, now, &id, &t, 1, 1, true);
        assert!(
            matches!(
                o,
                Outcome::AttemptFinished {
                    task_state: TaskState::Done,
                    ..
                }
            ),
            "{o:?}"
        );
    }
    let r = run(&kv, &id);
    assert_eq!(r.state, RunState::Done);
    assert!(kv.scan_prefix(Table::ActiveRuns, b"").unwrap().is_empty());
    assert!(kv.scan_prefix(Table::Assignments, b"").unwrap().is_empty());
    let info: NodeInfo = get_json(&kv, Table::Nodes, &keys::node(1))
        .unwrap()
        .unwrap();
    assert_eq!(info.running, 0, "slots given back");
}

#[test]
fn stale_attempts_are_fenced_and_failures_retry_then_fail() {
    let (mut kv, id) = setup_chain(2, 1);
    // Wrong attempt number and wrong node are both rejected.
    assert!(matches!(
        finish(&mut kv, 2, &id, "t0", 2, 1, true),
        Outcome::StaleAttempt { current: 1 }
    ));
    assert!(matches!(
        finish(&mut kv, 2, &id, "t0", 1, 9, true),
        Outcome::StaleAttempt { .. }
    ));
    // Attempt 1 fails: retrying after the delay.
    finish(&mut kv, 3, &id, "t0", 1, 1, false);
    let r = run(&kv, &id);
    assert_eq!(r.tasks["t0"].state, TaskState::Retrying);
    assert_eq!(r.tasks["t0"].next_try_ms, Some(103));
    // A late report of attempt 1 is stale now.
    assert!(matches!(
        finish(&mut kv, 4, &id, "t0", 1, 1, true),
        Outcome::StaleAttempt { .. }
    ));
    // Supervise after the delay assigns attempt 2.
    apply(&mut kv, &heartbeat(1, 100)).unwrap();
    apply(&mut kv, &req("s", 104, Command::Supervise { term: 1 })).unwrap();
    assert_eq!(run(&kv, &id).tasks["t0"].attempt, 2);
    finish(&mut kv, 105, &id, "t0", 2, 1, false);
    let r = run(&kv, &id);
    assert_eq!(r.tasks["t0"].state, TaskState::Failed);
    assert_eq!(r.tasks["t1"].state, TaskState::UpstreamFailed);
    assert_eq!(r.state, RunState::Failed);
}

#[test]
fn expired_leases_retry_elsewhere_and_stale_terms_are_ignored() {
    let (mut kv, id) = setup_chain(1, 0);
    apply(&mut kv, &heartbeat(2, 1)).unwrap();
    let stale = apply_request(
        &mut kv,
        &req("s0", 50_000, Command::Supervise { term: 1 }),
        2,
    )
    .unwrap();
    assert!(matches!(stale.outcome, Outcome::StaleTerm { .. }));
    // Node 1 stops heartbeating; node 2 keeps going; node 1's lease (1 s) expires.
    apply(&mut kv, &heartbeat(2, 16_000)).unwrap();
    apply(&mut kv, &req("s1", 16_001, Command::Supervise { term: 1 })).unwrap();
    let r = run(&kv, &id);
    let t = &r.tasks["t0"];
    assert_eq!(t.attempt, 2, "lost attempt retried as attempt 2");
    assert_eq!(t.attempts[0].node, 1);
    assert_eq!(t.attempts[1].node, 2, "on the live node");
    assert_eq!(t.state, TaskState::Running);
    assert!(matches!(
        finish(&mut kv, 16_002, &id, "t0", 1, 1, true),
        Outcome::StaleAttempt { current: 2 }
    ));
    finish(&mut kv, 16_003, &id, "t0", 2, 2, true);
    assert_eq!(run(&kv, &id).state, RunState::Done);
}

#[test]
fn fire_window_dedups_and_advances_the_cursor() {
    let mut kv = MemKv::default();
    apply(&mut kv, &req("p", 0, put("t", "d", None))).unwrap();
    let fire = |id: &str, s: i64, e: i64| {
        req(
            id,
            5,
            Command::FireWindow {
                tenant: "t".into(),
                dag_id: "d".into(),
                window: Window {
                    start_ms: s,
                    end_ms: e,
                },
                term: 1,
            },
        )
    };
    let a = apply(&mut kv, &fire("a", 0, 10)).unwrap().outcome;
    let b = apply(&mut kv, &fire("b", 0, 10)).unwrap().outcome;
    assert!(matches!(a, Outcome::Fired { created: true, .. }));
    assert!(matches!(b, Outcome::Fired { created: false, .. }));
    let c = kv
        .get(Table::Cursors, &keys::dag("t", "d"))
        .unwrap()
        .unwrap();
    assert_eq!(keys::from_ordered_i64(&c), Some(10));
}

#[test]
fn max_active_runs_queues_in_window_order_and_cancel_frees_the_slot() {
    let (mut kv, first) = setup_chain(1, 0);
    let second = match apply(&mut kv, &req("r2", 2, trigger("t", "c", 20, 30)))
        .unwrap()
        .outcome
    {
        Outcome::RunTriggered { run_id, state, .. } => {
            assert_eq!(state, RunState::Queued);
            run_id
        }
        o => panic!("{o:?}"),
    };
    let cancel = Command::CancelRun {
        tenant: "t".into(),
        run_id: first.clone(),
    };
    apply(&mut kv, &req("c", 3, cancel)).unwrap();
    assert_eq!(run(&kv, &first).state, RunState::Cancelled);
    assert_eq!(
        run(&kv, &second).state,
        RunState::Running,
        "next queued run starts"
    );
    let retry = Command::RetryRun {
        tenant: "t".into(),
        run_id: first.clone(),
    };
    let o = apply(&mut kv, &req("rr", 4, retry)).unwrap().outcome;
    assert!(matches!(o, Outcome::RunRetried { tasks: 1, .. }), "{o:?}");
    assert_eq!(
        run(&kv, &first).state,
        RunState::Queued,
        "waits for the running one"
    );
}

#[test]
fn a_restarted_node_loses_its_old_attempts() {
    let (mut kv, id) = setup_chain(1, 0);
    assert_eq!(run(&kv, &id).tasks["t0"].attempts[0].node, 1);
    let hb = Command::Heartbeat {
        node: 1,
        incarnation: "i2".into(),
        slots: 2,
        running: vec![],
        lease_ms: 1000,
    };
    apply(&mut kv, &req("hb-new", 5, hb)).unwrap();
    let t = &run(&kv, &id).tasks["t0"];
    assert_eq!(t.attempts[0].state, TaskState::Failed);
    assert_eq!(t.attempt, 2, "retried at once as attempt 2");
    assert_eq!(t.state, TaskState::Running);
}

#[test]
fn supervise_marks_sla_misses_and_purge_drops_old_history() {
    let mut kv = MemKv::default();
    let mut sp = chain_spec("slow", 1, 0);
    sp.sla_ms = Some(1000);
    sp.webhook = Some("http://127.0.0.1:1/hook".into());
    apply(&mut kv, &heartbeat(1, 0)).unwrap();
    let put = Command::PutDag {
        tenant: "t".into(),
        spec: sp,
        expected_version: None,
    };
    apply(&mut kv, &req("p", 0, put)).unwrap();
    let id = match apply(&mut kv, &req("r", 10, trigger("t", "slow", 0, 5)))
        .unwrap()
        .outcome
    {
        Outcome::RunTriggered { run_id, .. } => run_id,
        o => panic!("{o:?}"),
    };
    assert_eq!(
        run(&kv, &id).sla_deadline_ms,
        Some(1010),
        "backfill: creation + sla"
    );
    apply(&mut kv, &heartbeat(1, 900)).unwrap();
    apply(&mut kv, &req("s1", 1000, Command::Supervise { term: 1 })).unwrap();
    assert!(!run(&kv, &id).sla_missed, "not yet");
    apply(&mut kv, &heartbeat(1, 1900)).unwrap();
    apply(&mut kv, &req("s2", 2000, Command::Supervise { term: 1 })).unwrap();
    assert!(run(&kv, &id).sla_missed);
    let counter = kv
        .get(Table::Counters, counters::SLA_MISSED)
        .unwrap()
        .unwrap();
    assert_eq!(u64::from_be_bytes(counter.try_into().unwrap()), 1);
    assert!(kv
        .get(Table::Notifications, &keys::notification(&id, "sla_miss"))
        .unwrap()
        .is_some());
    // The heartbeats above renewed nothing, so attempt 1's lease ran out at 2000 and
    // the task is on attempt 2 now: finish that one.
    let current = run(&kv, &id).tasks["t0"].attempt;
    assert_eq!(current, 2);
    finish(&mut kv, 2100, &id, "t0", current, 1, true);
    assert_eq!(run(&kv, &id).state, RunState::Done);
    // Purge before the end keeps it; purge after drops the run and its indexes.
    let purge = |before| Command::Purge {
        keep: None,
        term: 1,
        before_ms: before,
        records_before_ms: before,
    };
    let o = apply(&mut kv, &req("g1", 3000, purge(2000)))
        .unwrap()
        .outcome;
    assert!(matches!(o, Outcome::Purged { runs: 0, .. }), "{o:?}");
    let o = apply(&mut kv, &req("g2", 9000, purge(5000)))
        .unwrap()
        .outcome;
    assert!(matches!(o, Outcome::Purged { runs: 1, .. }), "{o:?}");
    assert!(kv.get(Table::Runs, id.as_bytes()).unwrap().is_none());
    for t in [
        Table::Windows,
        Table::RunsByDag,
        Table::RunsByTenant,
        Table::FinishedRuns,
        Table::Notifications,
        Table::Requests,
    ] {
        assert!(kv.scan_prefix(t, b"").unwrap().is_empty(), "{t:?} emptied");
    }
}

/// Raise the replicated protocol to 2 (term 1), as the leader does on a new cluster.
fn v2(kv: &mut MemKv) {
    let r = apply(
        kv,
        &req(
            "raise",
            0,
            Command::RaiseProtocol {
                term: 1,
                version: 2,
            },
        ),
    )
    .unwrap();
    assert_eq!(r.outcome, Outcome::ProtocolRaised { version: 2 });
    assert_eq!(protocol_version(kv).unwrap(), 2);
}

fn fire(id: &str, now: Millis, dag: &str, s: i64, e: i64) -> Request {
    req(
        id,
        now,
        Command::FireWindow {
            tenant: "t".into(),
            dag_id: dag.into(),
            window: Window {
                start_ms: s,
                end_ms: e,
            },
            term: 1,
        },
    )
}

#[test]
fn a_protocol_newer_than_the_binary_stops_apply_instead_of_diverging() {
    let mut kv = MemKv::default();
    let too_new = Command::RaiseProtocol {
        term: 1,
        version: PROTOCOL_VERSION + 1,
    };
    let err = apply(&mut kv, &req("x", 0, too_new)).unwrap_err();
    assert!(err.to_string().contains("upgrade this node"), "{err}");
    assert_eq!(protocol_version(&kv).unwrap(), 1, "nothing applied");
    // A stale term's raise changes nothing either.
    let stale = Command::RaiseProtocol {
        term: 0,
        version: 2,
    };
    let o = apply(&mut kv, &req("y", 0, stale)).unwrap().outcome;
    assert!(matches!(o, Outcome::StaleTerm { .. }), "{o:?}");
    assert_eq!(protocol_version(&kv).unwrap(), 1);
}

#[test]
fn the_cluster_clock_never_goes_back_and_no_lease_is_born_expired() {
    for protocol in [1, 2] {
        let mut kv = MemKv::default();
        if protocol == 2 {
            v2(&mut kv);
        }
        apply(&mut kv, &heartbeat(1, 50_000)).unwrap();
        let put = Command::PutDag {
            tenant: "t".into(),
            spec: chain_spec("c", 1, 0),
            expected_version: None,
        };
        apply(&mut kv, &req("p", 50_000, put)).unwrap();
        // A request stamped by a node whose clock is 40 s behind.
        let o = apply(&mut kv, &req("r", 10_000, trigger("t", "c", 0, 10)))
            .unwrap()
            .outcome;
        let Outcome::RunTriggered { run_id, .. } = o else {
            panic!("{o:?}")
        };
        let r = run(&kv, &run_id);
        let lease_until = r.tasks["t0"].attempts[0].lease_until_ms;
        if protocol == 2 {
            assert_eq!(r.created_ms, 50_000, "cluster time, not the stale stamp");
            assert_eq!(lease_until, 51_000, "a full lease from cluster time");
        } else {
            assert!(
                lease_until < 50_000,
                "protocol 1: born expired ({lease_until})"
            );
        }
    }
}

#[test]
fn a_new_term_with_a_clock_ahead_waits_a_full_lease_before_expiring() {
    for protocol in [1, 2] {
        let mut kv = MemKv::default();
        if protocol == 2 {
            v2(&mut kv);
        }
        apply(&mut kv, &heartbeat(1, 0)).unwrap();
        apply(&mut kv, &heartbeat(2, 0)).unwrap();
        let put = Command::PutDag {
            tenant: "t".into(),
            spec: chain_spec("c", 1, 0),
            expected_version: None,
        };
        apply(&mut kv, &req("p", 0, put)).unwrap();
        let o = apply(&mut kv, &req("r", 1, trigger("t", "c", 0, 10)))
            .unwrap()
            .outcome;
        let Outcome::RunTriggered { run_id, .. } = o else {
            panic!("{o:?}")
        };
        // Term 2's leader runs 60 s ahead: its first pass must not expire the lease
        // (node 1 may still be inside its self-fencing window).
        let s = |id: &str, now: Millis| req(id, now, Command::Supervise { term: 2 });
        apply_request(
            &mut kv,
            &req("hb2", 60_000, heartbeat(2, 60_000).command),
            2,
        )
        .unwrap();
        apply_request(&mut kv, &s("s1", 60_001), 2).unwrap();
        let attempt = run(&kv, &run_id).tasks["t0"].attempt;
        if protocol == 1 {
            assert_eq!(attempt, 2, "protocol 1 expires at once");
            continue;
        }
        assert_eq!(attempt, 1, "not expired within the new term's first lease");
        apply_request(
            &mut kv,
            &req("hb3", 61_000, heartbeat(2, 61_000).command),
            2,
        )
        .unwrap();
        apply_request(&mut kv, &s("s2", 61_002), 2).unwrap();
        let t = &run(&kv, &run_id).tasks["t0"];
        assert_eq!(t.attempt, 2, "expired after a full lease of term 2");
        assert_eq!(t.attempts[1].node, 2);
    }
}

#[test]
fn a_fired_window_never_fires_again_after_purge_or_delete_and_recreate() {
    for protocol in [1, 2] {
        let mut kv = MemKv::default();
        if protocol == 2 {
            v2(&mut kv);
        }
        apply(&mut kv, &heartbeat(1, 0)).unwrap();
        let put = |id: &str, now| {
            req(
                id,
                now,
                Command::PutDag {
                    tenant: "t".into(),
                    spec: chain_spec("c", 1, 0),
                    expected_version: None,
                },
            )
        };
        apply(&mut kv, &put("p1", 0)).unwrap();
        let o = apply(&mut kv, &fire("f1", 1, "c", 0, 10)).unwrap().outcome;
        let Outcome::Fired {
            run_id,
            created: true,
        } = o
        else {
            panic!("{o:?}")
        };
        finish(&mut kv, 2, &run_id, "t0", 1, 1, true);
        let purge = Command::Purge {
            term: 1,
            before_ms: 1_000,
            records_before_ms: 0,
            keep: Some(Retention {
                runs_ms: 100,
                records_ms: 1_000_000,
            }),
        };
        let o = apply(&mut kv, &req("purge", 1_000, purge)).unwrap().outcome;
        assert!(matches!(o, Outcome::Purged { runs: 1, .. }), "{o:?}");
        let again = apply(&mut kv, &fire("f2", 1_001, "c", 0, 10))
            .unwrap()
            .outcome;
        if protocol == 1 {
            assert!(
                matches!(again, Outcome::Fired { created: true, .. }),
                "protocol 1 fires a purged window twice: {again:?}"
            );
            continue;
        }
        assert_eq!(again, Outcome::AlreadyFired { watermark: 10 });
        // Delete and re-create: the watermark holds, creation time is new.
        let del = Command::DeleteDag {
            tenant: "t".into(),
            dag_id: "c".into(),
        };
        apply(&mut kv, &req("del", 2_000, del)).unwrap();
        apply(&mut kv, &put("p2", 3_000)).unwrap();
        let dag: Dag = get_json(&kv, Table::Dags, &keys::dag("t", "c"))
            .unwrap()
            .unwrap();
        assert_eq!(dag.created_ms, 3_000, "re-created now, not at 0");
        let o = apply(&mut kv, &fire("f3", 3_001, "c", 0, 10))
            .unwrap()
            .outcome;
        assert_eq!(o, Outcome::AlreadyFired { watermark: 10 });
        let o = apply(&mut kv, &fire("f4", 3_002, "c", 10, 20))
            .unwrap()
            .outcome;
        assert!(matches!(o, Outcome::Fired { created: true, .. }), "{o:?}");
    }
}

#[test]
fn purge_cutoffs_come_from_the_cluster_clock() {
    let mut kv = MemKv::default();
    v2(&mut kv);
    apply(&mut kv, &req("p", 100_000, put("t", "d", None))).unwrap();
    // A leader whose clock is far behind proposes absolute cutoffs from its clock;
    // protocol 2 uses the retentions against the cluster clock instead.
    let purge = Command::Purge {
        term: 1,
        before_ms: i64::MAX,
        records_before_ms: i64::MAX,
        keep: Some(Retention {
            runs_ms: 1_000,
            records_ms: 1_000,
        }),
    };
    let o = apply(&mut kv, &req("x", 50_000, purge)).unwrap().outcome;
    assert_eq!(
        o,
        Outcome::Purged {
            runs: 0,
            records: 0,
            more: false
        },
        "nothing early"
    );
    assert!(kv.get(Table::Requests, b"p").unwrap().is_some());
}

#[test]
fn a_retried_run_gets_its_retries_again_and_is_counted_once() {
    let (mut kv, id) = setup_chain(1, 1);
    v2(&mut kv);
    let failed = |kv: &MemKv| read_u64(kv, counters::RUNS_FAILED).unwrap();
    finish(&mut kv, 2, &id, "t0", 1, 1, false);
    apply(&mut kv, &heartbeat(1, 200)).unwrap();
    apply(&mut kv, &req("s", 200, Command::Supervise { term: 1 })).unwrap();
    finish(&mut kv, 201, &id, "t0", 2, 1, false);
    assert_eq!(run(&kv, &id).state, RunState::Failed);
    assert_eq!(failed(&kv), Some(1));
    let retry = Command::RetryRun {
        tenant: "t".into(),
        run_id: id.clone(),
    };
    apply(&mut kv, &req("rr", 300, retry)).unwrap();
    // Attempt 3 fails: with its retries given back it is retried, not failed.
    finish(&mut kv, 301, &id, "t0", 3, 1, false);
    let t = &run(&kv, &id).tasks["t0"];
    assert_eq!(t.state, TaskState::Retrying, "full retries again");
    apply(&mut kv, &heartbeat(1, 500)).unwrap();
    apply(&mut kv, &req("s2", 500, Command::Supervise { term: 1 })).unwrap();
    finish(&mut kv, 501, &id, "t0", 4, 1, false);
    assert_eq!(run(&kv, &id).state, RunState::Failed);
    assert_eq!(failed(&kv), Some(1), "a retried run is not counted twice");
    assert_eq!(read_u64(&kv, counters::RUNS_RETRIED).unwrap(), Some(1));
}

#[test]
fn sla_misses_while_queued_or_between_passes_are_marked() {
    for protocol in [1, 2] {
        let mut kv = MemKv::default();
        if protocol == 2 {
            v2(&mut kv);
        }
        let mut sp = chain_spec("q", 1, 0);
        sp.sla_ms = Some(1_000);
        sp.webhook = Some("http://127.0.0.1:1/hook".into());
        apply(&mut kv, &heartbeat(1, 0)).unwrap();
        let put = Command::PutDag {
            tenant: "t".into(),
            spec: sp,
            expected_version: None,
        };
        apply(&mut kv, &req("p", 0, put)).unwrap();
        let id = |o: Outcome| match o {
            Outcome::RunTriggered { run_id, .. } => run_id,
            o => panic!("{o:?}"),
        };
        let first = id(apply(&mut kv, &req("a", 1, trigger("t", "q", 0, 10)))
            .unwrap()
            .outcome);
        let queued = id(apply(&mut kv, &req("b", 1, trigger("t", "q", 10, 20)))
            .unwrap()
            .outcome);
        // The first run ends past its deadline (1,001) before any pass saw it late.
        finish(&mut kv, 1_005, &first, "t0", 1, 1, true);
        let r = run(&kv, &first);
        assert_eq!(r.state, RunState::Done);
        assert_eq!(r.sla_missed, protocol == 2, "ended late between passes");
        // Make the second run wait in the queue past its deadline: it started when
        // the first ended, so cancel it and queue a third behind a long first task.
        let _ = queued;
        let third = id(apply(&mut kv, &req("c", 1_100, trigger("t", "q", 20, 30)))
            .unwrap()
            .outcome);
        assert_eq!(
            run(&kv, &third).state,
            RunState::Queued,
            "behind max_active_runs"
        );
        apply(&mut kv, &heartbeat(1, 2_200)).unwrap();
        apply(&mut kv, &req("s", 2_200, Command::Supervise { term: 1 })).unwrap();
        let r = run(&kv, &third);
        assert_eq!(r.state, RunState::Queued);
        assert_eq!(r.sla_missed, protocol == 2, "queued past its deadline");
        let notified = kv
            .get(
                Table::Notifications,
                &keys::notification(&third, "sla_miss"),
            )
            .unwrap()
            .is_some();
        assert_eq!(notified, protocol == 2);
    }
}

/// What supervise read before the due index: every active run, and every DAG with
/// active runs for starting queued ones. The index must change exactly what this did.
#[derive(Default, Debug)]
struct FullScanKv(MemKv);

impl Kv for FullScanKv {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.0.get(table, key)
    }
    fn put(&mut self, table: Table, key: Vec<u8>, value: Vec<u8>) {
        self.0.put(table, key, value)
    }
    fn delete(&mut self, table: Table, key: Vec<u8>) {
        self.0.delete(table, key)
    }
    fn scan_prefix(&self, table: Table, prefix: &[u8]) -> Result<Entries, KvError> {
        self.0.scan_prefix(table, prefix)
    }
    fn supervision(&self, _now: Millis) -> Result<Supervision, KvError> {
        let mut sup = Supervision::default();
        let mut dags = std::collections::BTreeSet::new();
        for (k, _) in self.0.scan_prefix(Table::ActiveRuns, b"")? {
            let mut parts = k.split(|b| *b == 0).map(|p| String::from_utf8_lossy(p));
            let (Some(t), Some(d), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            sup.runs.push(id.into_owned());
            dags.insert((t.into_owned(), d.into_owned()));
        }
        let always = crate::state::due::Load {
            queued: 1,
            running: 0,
        };
        sup.queued_dags = dags.into_iter().map(|k| (k, always)).collect();
        Ok(sup)
    }
    /// Every active run, in key order, that is due whatever the clock, judged from the
    /// run itself rather than from an index.
    fn waiting_runs(&self, limit: usize) -> Result<Vec<String>, KvError> {
        let mut runs = Vec::new();
        for (k, _) in self.0.scan_prefix(Table::ActiveRuns, b"")? {
            let Some(bytes) = self.0.get(Table::Runs, keys::last_part(&k))? else {
                continue;
            };
            let view = crate::state::census::RunView::decode(&bytes);
            if view.as_ref().and_then(crate::state::due::due_at) == Some(Millis::MIN) {
                runs.push(String::from_utf8_lossy(keys::last_part(&k)).into_owned());
            }
        }
        runs.truncate(limit);
        Ok(runs)
    }
}

#[derive(Debug, Clone)]
enum Op {
    Put {
        dag: u8,
        wide: bool,
        max_active: u32,
        sla: bool,
        retries: u32,
    },
    Trigger {
        dag: u8,
        window: i64,
    },
    Heartbeat {
        node: u64,
        renew: bool,
    },
    Finish {
        pick: usize,
        ok: bool,
    },
    Cancel {
        pick: usize,
    },
    Supervise,
}

fn arb_op() -> impl proptest::strategy::Strategy<Value = (Op, i64)> {
    use proptest::prelude::*;
    let op = prop_oneof![
        (0u8..2, any::<bool>(), 1u32..3, any::<bool>(), 0u32..2).prop_map(
            |(dag, wide, max_active, sla, retries)| Op::Put {
                dag,
                wide,
                max_active,
                sla,
                retries
            }
        ),
        (0u8..2, 0i64..8).prop_map(|(dag, window)| Op::Trigger { dag, window }),
        (1u64..3, any::<bool>()).prop_map(|(node, renew)| Op::Heartbeat { node, renew }),
        (any::<usize>(), any::<bool>()).prop_map(|(pick, ok)| Op::Finish { pick, ok }),
        any::<usize>().prop_map(|pick| Op::Cancel { pick }),
        Just(Op::Supervise),
        Just(Op::Supervise),
    ];
    (op, 0i64..1500)
}

/// Turn an abstract op into a request against the current state of `kv`.
fn concrete(kv: &MemKv, op: &Op, n: usize, now: Millis) -> Option<Request> {
    let assignments: Vec<(u64, AttemptRef)> = kv
        .scan_prefix(Table::Assignments, b"")
        .unwrap()
        .into_iter()
        .filter_map(|(k, v)| {
            let node = u64::from_be_bytes(k.get(..8)?.try_into().ok()?);
            let mut rest = k.get(9..)?.split(|b| *b == 0);
            let run_id = String::from_utf8_lossy(rest.next()?).into_owned();
            let task_id = String::from_utf8_lossy(rest.next()?).into_owned();
            let attempt = u32::from_be_bytes(v.as_slice().try_into().ok()?);
            Some((
                node,
                AttemptRef {
                    run_id,
                    task_id,
                    attempt,
                },
            ))
        })
        .collect();
    let command = match op {
        Op::Put {
            dag,
            wide,
            max_active,
            sla,
            retries,
        } => {
            let mut spec = if *wide {
                wide_spec(&format!("d{dag}"))
            } else {
                chain_spec(&format!("d{dag}"), 3, *retries)
            };
            spec.tasks.truncate(3);
            spec.max_active_runs = *max_active;
            spec.sla_ms = sla.then_some(2_000);
            Command::PutDag {
                tenant: "t".into(),
                spec,
                expected_version: None,
            }
        }
        Op::Trigger { dag, window } => {
            trigger("t", &format!("d{dag}"), window * 10, window * 10 + 10)
        }
        Op::Heartbeat { node, renew } => Command::Heartbeat {
            node: *node,
            incarnation: "i1".into(),
            slots: 2,
            running: assignments
                .iter()
                .filter(|(at, _)| *renew && at == node)
                .map(|(_, a)| a.clone())
                .collect(),
            lease_ms: 1_000,
        },
        Op::Finish { pick, ok } => {
            let (node, attempt) = assignments.get(pick % assignments.len().max(1))?.clone();
            let result = if *ok {
                AttemptResult::Success { exit_code: Some(0) }
            } else {
                AttemptResult::Failed {
                    exit_code: Some(1),
                    error: "boom".into(),
                }
            };
            Command::FinishAttempt {
                attempt,
                node,
                result,
            }
        }
        Op::Cancel { pick } => {
            let runs = kv.scan_prefix(Table::Runs, b"").unwrap();
            let (k, _) = runs.get(pick % runs.len().max(1))?;
            Command::CancelRun {
                tenant: "t".into(),
                run_id: String::from_utf8_lossy(k).into_owned(),
            }
        }
        Op::Supervise => Command::Supervise { term: 1 },
    };
    Some(req(&format!("op{n}"), now, command))
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 200, failure_persistence: None, ..Default::default()
    })]

    /// Leases that expire, retries that come due, SLAs that pass, slots that free up,
    /// queues behind `max_active_runs`: a supervise pass that reads only the due runs
    /// leaves the same state and answers the same as one that reads every run.
    #[test]
    fn supervising_due_runs_equals_supervising_all(
        ops in proptest::collection::vec(arb_op(), 1..80),
        fair in proptest::bool::ANY,
    ) {
        let mut due = MemKv::default();
        let mut all = FullScanKv::default();
        if fair {
            let raise = Command::RaiseProtocol { term: 1, version: PROTOCOL_VERSION };
            apply(&mut due, &req("raise", 0, raise.clone())).unwrap();
            apply_request(&mut all, &req("raise", 0, raise), 1).unwrap();
        }
        let mut now = 1;
        for (n, (op, dt)) in ops.iter().enumerate() {
            now += dt;
            let Some(r) = concrete(&due, op, n, now) else { continue };
            let a = apply(&mut due, &r).unwrap();
            let b = apply_request(&mut all, &r, 1).unwrap();
            proptest::prop_assert_eq!(&a, &b, "op {} {:?}", n, op);
            proptest::prop_assert!(due == all.0, "state differs after op {} {:?}", n, op);
            // A task runs exactly while it has an assignment: the fair share counts
            // running tasks from protocol 8 and assignments before.
            let running: u32 = due.attempts_by_tenant().unwrap().values().sum();
            let assigned = due.scan_prefix(Table::Assignments, b"").unwrap().len();
            proptest::prop_assert_eq!(running as usize, assigned, "after op {} {:?}", n, op);
        }
    }
}

/// Two nodes of two slots; tenant `a` triggers a ten-task wide run with `quota`, while
/// tenant `b` has a DAG (or not); the leader's supervise pass then fills the slots.
/// Returns how many of `a`'s tasks run.
fn hog_slots(protocol: u32, other_has_dag: bool, percent: Option<u32>) -> usize {
    let mut kv = at_protocol(protocol);
    apply(&mut kv, &heartbeat(1, 1)).unwrap();
    apply(&mut kv, &heartbeat(2, 1)).unwrap();
    let put_wide = Command::PutDag {
        tenant: "a".into(),
        spec: wide_spec("wide"),
        expected_version: None,
    };
    apply(&mut kv, &req("pa", 2, put_wide)).unwrap();
    if other_has_dag {
        apply(&mut kv, &req("pb", 2, put("b", "d", None))).unwrap();
    }
    let quota = Quota {
        slot_share_percent: percent,
        ..QUOTA
    };
    let r = apply(
        &mut kv,
        &with_quota(req("t", 3, trigger("a", "wide", 0, 10)), quota),
    );
    let Outcome::RunTriggered { run_id, .. } = r.unwrap().outcome else {
        panic!("not triggered")
    };
    apply(&mut kv, &req("s", 4, Command::Supervise { term: 1 })).unwrap();
    running_tasks(&kv, &run_id)
}

#[test]
fn from_protocol_8_a_tenant_holds_at_most_its_cap_of_the_slots_while_others_have_dags() {
    // 4 live slots, a 50 % cap: two attempts, the fill of the supervise pass included.
    assert_eq!(hog_slots(8, true, Some(50)), 2);
    // Rounded down, never below one.
    assert_eq!(hog_slots(8, true, Some(60)), 2);
    assert_eq!(hog_slots(8, true, Some(1)), 1);
    // Alone on the cluster, a tenant uses every slot; so does a 100 % cap.
    assert_eq!(hog_slots(8, false, Some(50)), 4);
    assert_eq!(hog_slots(8, true, Some(100)), 4);
    // Before protocol 8 (and for runs created without the cap) nothing changes.
    assert_eq!(hog_slots(7, true, Some(50)), 4);
    assert_eq!(hog_slots(8, true, None), 4);
}

/// Tenants `a` and `b` each run a wide DAG under a 50 % cap of 4 slots while tenant `c`
/// has a DAG; then `c` triggers a one-task run. The attempts each holds after a supervise
/// pass, and then after `c`'s trigger.
fn three_tenants_slots(protocol: u32) -> ([usize; 2], [usize; 3]) {
    let mut kv = at_protocol(protocol);
    apply(&mut kv, &heartbeat(1, 1)).unwrap();
    apply(&mut kv, &heartbeat(2, 1)).unwrap();
    let quota = Quota {
        slot_share_percent: Some(50),
        ..QUOTA
    };
    let mut runs = Vec::new();
    for tenant in ["a", "b"] {
        let put_wide = Command::PutDag {
            tenant: tenant.into(),
            spec: wide_spec("wide"),
            expected_version: None,
        };
        apply(&mut kv, &req(&format!("p{tenant}"), 2, put_wide)).unwrap();
    }
    apply(&mut kv, &req("pc", 2, put("c", "d", None))).unwrap();
    for tenant in ["a", "b"] {
        let t = with_quota(
            req(&format!("t{tenant}"), 3, trigger(tenant, "wide", 0, 10)),
            quota,
        );
        let Outcome::RunTriggered { run_id, .. } = apply(&mut kv, &t).unwrap().outcome else {
            panic!("not triggered")
        };
        runs.push(run_id);
    }
    apply(&mut kv, &req("s", 4, Command::Supervise { term: 1 })).unwrap();
    let before = [running_tasks(&kv, &runs[0]), running_tasks(&kv, &runs[1])];
    let t = with_quota(req("tc", 5, trigger("c", "d", 0, 10)), quota);
    let Outcome::RunTriggered { run_id, .. } = apply(&mut kv, &t).unwrap().outcome else {
        panic!("not triggered")
    };
    runs.push(run_id);
    apply(&mut kv, &req("s2", 6, Command::Supervise { term: 1 })).unwrap();
    let after = [0, 1, 2].map(|i| running_tasks(&kv, &runs[i]));
    (before, after)
}

#[test]
fn from_protocol_9_tenants_together_leave_a_slot_for_a_tenant_that_holds_none() {
    // Each within its own cap (2 of 4), `a` and `b` used to fill every slot between them:
    // `c`'s run waited for their tasks to end.
    assert_eq!(three_tenants_slots(8), ([2, 2], [2, 2, 0]));
    // From protocol 9 the tenants holding slots stop at the cap together while `c` holds
    // none; `b`'s first slot came from the reserve, and `c` takes the slot left at once.
    assert_eq!(three_tenants_slots(9), ([2, 1], [2, 1, 1]));
}

#[test]
fn from_protocol_8_a_finished_attempt_hands_its_slot_to_a_waiting_run() {
    for protocol in [7, 8] {
        let mut kv = at_protocol(protocol);
        let hb = Command::Heartbeat {
            node: 1,
            incarnation: "i1".into(),
            slots: 1,
            running: vec![],
            lease_ms: 10_000,
        };
        apply(&mut kv, &req("hb", 1, hb)).unwrap();
        for dag in ["a", "b"] {
            apply(&mut kv, &req(&format!("p{dag}"), 2, put("t", dag, None))).unwrap();
        }
        let mut ids = Vec::new();
        for (n, dag) in ["a", "b"].into_iter().enumerate() {
            let r = apply(
                &mut kv,
                &req(&format!("t{dag}"), 3, trigger("t", dag, 0, 10)),
            );
            let Outcome::RunTriggered { run_id, .. } = r.unwrap().outcome else {
                panic!("not triggered")
            };
            // The first run takes the only slot; the second waits for it.
            assert_eq!(running_tasks(&kv, &run_id), 1 - n, "protocol {protocol}");
            ids.push(run_id);
        }
        let out = finish(&mut kv, 4, &ids[0], "extract", 1, 1, true);
        assert!(matches!(out, Outcome::AttemptFinished { .. }), "{out:?}");
        // Before protocol 8 the freed slot stayed idle until the next supervise pass.
        let expected = usize::from(protocol >= 8);
        assert_eq!(running_tasks(&kv, &ids[1]), expected, "protocol {protocol}");
        let held: Vec<_> = kv
            .scan_prefix(Table::Assignments, b"")
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            held.len(),
            expected,
            "protocol {protocol}: one assignment per attempt"
        );
    }
}

#[test]
fn from_protocol_8_a_tenant_with_runs_left_but_no_dag_still_counts_as_another_tenant() {
    let mut kv = at_protocol(8);
    for node in [1, 2] {
        apply(&mut kv, &heartbeat(node, 1)).unwrap();
    }
    // Tenant `b` triggers a run, then deletes its only DAG: the run stays unfinished.
    apply(&mut kv, &req("pb", 2, put("b", "d", None))).unwrap();
    apply(&mut kv, &req("tb", 2, trigger("b", "d", 0, 10))).unwrap();
    let delete = Command::DeleteDag {
        tenant: "b".into(),
        dag_id: "d".into(),
    };
    apply(&mut kv, &req("db", 2, delete)).unwrap();
    let put_wide = Command::PutDag {
        tenant: "a".into(),
        spec: wide_spec("wide"),
        expected_version: None,
    };
    apply(&mut kv, &req("pa", 3, put_wide)).unwrap();
    let quota = Quota {
        slot_share_percent: Some(50),
        ..QUOTA
    };
    let r = apply(
        &mut kv,
        &with_quota(req("ta", 3, trigger("a", "wide", 0, 10)), quota),
    );
    let Outcome::RunTriggered { run_id, .. } = r.unwrap().outcome else {
        panic!("not triggered")
    };
    apply(&mut kv, &req("s", 4, Command::Supervise { term: 1 })).unwrap();
    // Four slots, `b`'s run holds one: `a` gets its cap of two, not the three left.
    assert_eq!(running_tasks(&kv, &run_id), 2);
}

/// A client write that leaves a request record (and, with `key`, an idempotency record)
/// at cluster time `now`.
fn recorded_write(id: &str, now: Millis, key: Option<&str>) -> Request {
    let mut r = req(
        id,
        now,
        Command::SetPaused {
            tenant: "t".into(),
            dag_id: "none".into(),
            paused: true,
        },
    );
    r.idempotency = key.map(|k| IdempotencyKey {
        tenant: "t".into(),
        key: k.into(),
        fingerprint: "f".into(),
    });
    r
}

fn purge_records_before(id: &str, now: Millis, before: Millis) -> Request {
    let purge = Command::Purge {
        term: 1,
        before_ms: i64::MIN,
        records_before_ms: before,
        keep: None,
    };
    req(id, now, purge)
}

/// The request and idempotency records left (index entries not counted).
fn records_left(kv: &MemKv) -> Vec<String> {
    [Table::Requests, Table::Idempotency]
        .into_iter()
        .flat_map(|t| kv.scan_prefix(t, b"").unwrap())
        .filter(|(k, _)| k.first() != Some(&0))
        .map(|(k, _)| String::from_utf8_lossy(&k).replace('\0', "/"))
        .collect()
}

#[test]
fn from_protocol_10_the_purge_finds_records_by_time_and_old_ones_by_a_scan_until_gone() {
    let mut kv = at_protocol(9);
    apply(&mut kv, &recorded_write("old", 100, Some("k-old"))).unwrap();
    let raise = Command::RaiseProtocol {
        term: 1,
        version: 10,
    };
    apply(&mut kv, &req("r10", 200, raise)).unwrap();
    apply(&mut kv, &recorded_write("new", 300, Some("k-new"))).unwrap();
    apply(&mut kv, &recorded_write("newer", 400, None)).unwrap();
    let index = |kv: &MemKv| {
        kv.keys_below(Table::Requests, &[0], &[1], usize::MAX)
            .unwrap()
            .len()
    };
    assert_eq!(index(&kv), 2, "records from protocol 10 are indexed");
    // A cutoff before the raise: the records from before go (found by the full scan).
    let o = apply(&mut kv, &purge_records_before("g1", 500, 150)).unwrap();
    assert_eq!(
        o.outcome,
        Outcome::Purged {
            runs: 0,
            records: 2,
            more: false
        }
    );
    assert_eq!(records_left(&kv), ["new", "newer", "t/k-new"]);
    // Past the raise: indexed records go by their index, and the scan is done for good.
    let o = apply(&mut kv, &purge_records_before("g2", 600, 350)).unwrap();
    assert_eq!(
        o.outcome,
        Outcome::Purged {
            runs: 0,
            records: 2,
            more: false
        }
    );
    assert_eq!(records_left(&kv), ["newer"]);
    assert_eq!(index(&kv), 1, "newer's entry is left");
    assert!(read_i64(&kv, clock::RECORDS_INDEXED_FROM)
        .unwrap()
        .is_none());
    // With the scan done, a record without an index entry is no longer read at all.
    let unindexed = RequestRecord {
        outcome: Outcome::Done,
        created_ms: 1,
    };
    put_json(&mut kv, Table::Requests, b"unindexed".to_vec(), &unindexed);
    let o = apply(&mut kv, &purge_records_before("g3", 700, 550)).unwrap();
    assert_eq!(
        o.outcome,
        Outcome::Purged {
            runs: 0,
            records: 1,
            more: false
        }
    );
    assert_eq!(records_left(&kv), ["unindexed"]);
    assert_eq!(index(&kv), 0);
}

#[test]
fn from_protocol_10_an_index_entry_removes_only_the_record_it_indexed() {
    let mut kv = at_protocol(10);
    apply(&mut kv, &recorded_write("w", 300, Some("k"))).unwrap();
    // An entry left from an earlier record under the same key (removed by the scan while
    // the cluster moved to 10): it goes, the newer record stays.
    let key = keys::idempotency("t", "k");
    kv.put(
        Table::Idempotency,
        keys::record_by_time(100, &key),
        Vec::new(),
    );
    let o = apply(&mut kv, &purge_records_before("g", 400, 200)).unwrap();
    assert_eq!(
        o.outcome,
        Outcome::Purged {
            runs: 0,
            records: 0,
            more: false
        }
    );
    assert!(kv.get(Table::Idempotency, &key).unwrap().is_some());
    assert_eq!(
        kv.keys_below(Table::Idempotency, &[0], &[1], usize::MAX)
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn from_protocol_10_one_purge_removes_at_most_a_chunk_of_each() {
    for protocol in [9, 10] {
        let mut kv = at_protocol(protocol);
        // Past the raise's time: nothing from before 10 is left to scan for.
        apply(&mut kv, &purge_records_before("g0", 1, 1)).unwrap();
        let n = PURGE_CHUNK + 3;
        for i in 0..n {
            apply(
                &mut kv,
                &recorded_write(&format!("w{i:05}"), 10 + i as i64, None),
            )
            .unwrap();
        }
        let o = apply(&mut kv, &purge_records_before("g", 100_000, 50_000)).unwrap();
        let purged = |records: usize, more| Outcome::Purged {
            runs: 0,
            records: records as u32,
            more,
        };
        if protocol < 10 {
            assert_eq!(
                o.outcome,
                purged(n, false),
                "protocol {protocol}: all at once"
            );
        } else {
            assert_eq!(
                o.outcome,
                purged(PURGE_CHUNK, true),
                "a chunk, and more to do"
            );
            assert_eq!(records_left(&kv), ["w05000", "w05001", "w05002"]);
            let o = apply(&mut kv, &purge_records_before("g2", 100_001, 50_000)).unwrap();
            assert_eq!(o.outcome, purged(3, false));
            assert_eq!(
                kv.keys_below(Table::Requests, &[0], &[1], usize::MAX)
                    .unwrap()
                    .len(),
                0
            );
        }
        assert!(records_left(&kv).is_empty());
    }
}

#[test]
fn from_protocol_10_records_written_at_the_raise_s_own_time_are_purged_too() {
    let mut kv = at_protocol(9);
    // In the raise's batch (one stamp), before it: no index entry; after it: indexed.
    apply(&mut kv, &recorded_write("with-raise", 200, None)).unwrap();
    let raise = Command::RaiseProtocol {
        term: 1,
        version: 10,
    };
    apply(&mut kv, &req("r10", 200, raise)).unwrap();
    apply(&mut kv, &recorded_write("after-raise", 200, None)).unwrap();
    let nothing = Outcome::Purged {
        runs: 0,
        records: 0,
        more: false,
    };
    // A cutoff at the raise's time removes neither (not older), and the scan goes on.
    let o = apply(&mut kv, &purge_records_before("g1", 300, 200)).unwrap();
    assert_eq!(o.outcome, nothing);
    assert!(read_i64(&kv, clock::RECORDS_INDEXED_FROM)
        .unwrap()
        .is_some());
    // Past it: both go, the one without an entry in the scan's last pass.
    let o = apply(&mut kv, &purge_records_before("g2", 400, 201)).unwrap();
    let both = Outcome::Purged {
        runs: 0,
        records: 2,
        more: false,
    };
    assert_eq!(o.outcome, both);
    assert!(records_left(&kv).is_empty(), "{:?}", records_left(&kv));
    assert!(read_i64(&kv, clock::RECORDS_INDEXED_FROM)
        .unwrap()
        .is_none());
    assert!(kv
        .keys_below(Table::Requests, &[0], &[1], usize::MAX)
        .unwrap()
        .is_empty());
}

/// A DAG whose only task runs a command.
fn shell_spec(dag: &str) -> DagSpec {
    let mut s = spec(dag);
    s.tasks[0].kind = TaskKind::Shell {
        command: "true".into(),
    };
    s
}

fn stored(kv: &MemKv, dag: &str, version: u64) -> StoredVersion {
    get_json(
        kv,
        Table::DagVersions,
        &keys::dag_version("t", dag, version),
    )
    .unwrap()
    .expect("the version is stored")
}

#[test]
fn from_protocol_11_a_shell_dag_needs_the_scope_in_apply_and_its_versions_carry_the_grant() {
    let put_shell = |id: &str, dag: &str, scope: bool, subject: &str| Request {
        shell_scope: scope,
        subject: Some(subject.into()),
        ..req(
            id,
            1,
            Command::PutDag {
                tenant: "t".into(),
                spec: shell_spec(dag),
                expected_version: None,
            },
        )
    };
    // At protocol 10 apply trusts the API's check: stored as the bare spec, no grant.
    let mut kv = at_protocol(10);
    let r = apply(&mut kv, &put_shell("old", "old", false, "mallory")).unwrap();
    assert!(
        matches!(r.outcome, Outcome::DagPut { version: 1, .. }),
        "{r:?}"
    );
    let bare = kv
        .get(Table::DagVersions, &keys::dag_version("t", "old", 1))
        .unwrap()
        .unwrap();
    assert_eq!(bare, serde_json::to_vec(&shell_spec("old")).unwrap());
    apply(&mut kv, &req("noop", 2, put("t", "plain", None))).unwrap();

    // The raise grants the shell versions stored before it, and only those.
    let raise = Command::RaiseProtocol {
        term: 1,
        version: 11,
    };
    apply(&mut kv, &req("raise11", 3, raise)).unwrap();
    assert_eq!(
        stored(&kv, "old", 1).shell_grant,
        Some(ShellGrant { by: None })
    );
    assert_eq!(stored(&kv, "plain", 1).shell_grant, None);

    // Without the scope a shell DAG is refused in apply: nothing is written, not even
    // an unchanged version of an existing one.
    let before = kv.0.clone();
    for (id, dag) in [("new", "new"), ("same", "old")] {
        let r = apply(&mut kv, &put_shell(id, dag, false, "mallory")).unwrap();
        assert!(matches!(r.outcome, Outcome::Forbidden { .. }), "{r:?}");
    }
    let changed: Vec<_> =
        kv.0.keys()
            .filter(|k| {
                before.get(*k) != kv.0.get(*k) && k.0 != Table::Requests && k.0 != Table::Counters
            })
            .collect();
    assert!(changed.is_empty(), "a refused write changed {changed:?}");

    // With it, the version records who was granted it.
    let r = apply(&mut kv, &put_shell("granted", "new", true, "alice")).unwrap();
    assert!(
        matches!(r.outcome, Outcome::DagPut { version: 1, .. }),
        "{r:?}"
    );
    let granted = Some(ShellGrant {
        by: Some("alice".into()),
    });
    assert_eq!(stored(&kv, "new", 1).shell_grant, granted);
    // A DAG without shell tasks stays the bare spec, whoever writes it.
    apply(&mut kv, &req("plain2", 4, put("t", "plain2", None))).unwrap();
    assert_eq!(stored(&kv, "plain2", 1).shell_grant, None);

    // Pausing (by anyone with write) makes a version with the same tasks and grant.
    let pause = Command::SetPaused {
        tenant: "t".into(),
        dag_id: "new".into(),
        paused: true,
    };
    let r = apply(&mut kv, &req("pause", 5, pause)).unwrap();
    assert!(
        matches!(r.outcome, Outcome::DagPaused { version: 2, .. }),
        "{r:?}"
    );
    assert_eq!(stored(&kv, "new", 2).shell_grant, granted);
    assert!(stored(&kv, "new", 2).spec.paused);
}

#[test]
fn from_protocol_12_the_scan_for_unindexed_records_ends_when_none_is_left() {
    let counter = |kv: &MemKv| read_i64(kv, clock::RECORDS_INDEXED_FROM).unwrap();
    for version in [11, 12] {
        // Two records from before the raise, one older than the other.
        let mut kv = at_protocol(9);
        apply(&mut kv, &recorded_write("older", 100, None)).unwrap();
        apply(&mut kv, &recorded_write("younger", 180, Some("k"))).unwrap();
        let raise = Command::RaiseProtocol { term: 1, version };
        apply(&mut kv, &req("raise", 200, raise)).unwrap();
        apply(&mut kv, &recorded_write("indexed", 300, None)).unwrap();
        let purged = |records| Outcome::Purged {
            runs: 0,
            records,
            more: false,
        };
        // A cutoff between them: the older goes; the younger (two records) is still
        // to be found by the scan.
        let o = apply(&mut kv, &purge_records_before("g1", 400, 150)).unwrap();
        assert_eq!(o.outcome, purged(1));
        assert!(counter(&kv).is_some(), "{version}: the younger is left");
        // Both gone, the cutoff still before the raise: from 12 the scan ends.
        let o = apply(&mut kv, &purge_records_before("g2", 500, 190)).unwrap();
        assert_eq!(o.outcome, purged(2));
        assert_eq!(records_left(&kv), ["indexed"]);
        assert_eq!(
            counter(&kv).is_none(),
            version >= 12,
            "{version}: the scan ends once none is left"
        );
    }
    // A fresh cluster (raised straight from 1, nothing stored): its first purge ends
    // the scan, whatever its cutoff.
    let mut kv = at_protocol(12);
    apply(&mut kv, &recorded_write("w", 100, None)).unwrap();
    assert!(counter(&kv).is_some());
    let o = apply(&mut kv, &purge_records_before("g", 200, -1)).unwrap();
    assert_eq!(
        o.outcome,
        Outcome::Purged {
            runs: 0,
            records: 0,
            more: false
        }
    );
    assert!(counter(&kv).is_none());
    assert_eq!(records_left(&kv), ["w"]);
}

//! The replicated formats, kept decodable forever (issue 8, "Upgrades and determinism").
//!
//! `tests/fixtures/protocol/vN/` holds what the binary of protocol N wrote: a Raft log
//! (`log.json`), the snapshot of the state it leads to (`snapshot.json`, with its state
//! digest) and every table of that state (`tables.json`). The v2 log raises the protocol
//! from 1 to 2 and exercises every command kind; the v5 log goes on from it, raises to 5
//! and exercises what protocols 3 to 5 added (the caller's subject, manual runs without a
//! window, quotas refused and DAG versions dropped in apply); the v8 log goes on from
//! that, raises to 8 and exercises what protocols 6 to 8 added (a retry counted against
//! the run quota, a deleted DAG's tombstone, a tenant's share of the slots, a freed slot
//! handed on, a restarted node's attempts lost and placed again); the v11 log goes on
//! from that and exercises what protocols 9 to 11 added (a shell DAG stored before the
//! raise and granted by it, a shell DAG granted to its writer's subject and the grant
//! carried by a pause, one refused without the scope whose key stays free, request and
//! idempotency records indexed by time and a purge that reads the index, placement with
//! the reserve). Future binaries must:
//!
//! - decode every entry, and applying the log to an empty state machine must give exactly
//!   the recorded digest (behaviour changes only ever start at a later protocol raise, and
//!   new fields never change the bytes of old records);
//! - install the snapshot and reach the same digest;
//! - decode every value of every table into its type.
//!
//! The fixtures are written by `write_fixtures` (ignored; run it with
//! `cargo test --test wire_format -- --ignored` only when adding a new version's folder:
//! it refuses to overwrite one).

use std::collections::BTreeMap;
use std::path::PathBuf;

use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, EntryPayload, Membership, RaftSnapshotBuilder};
use orchestrator::raft::db::Db;
use orchestrator::raft::state_machine::StateMachineStore;
use orchestrator::raft::types::{Entry, LogId, Member, SnapshotMeta};
use orchestrator::state::command::{AttemptRef, AttemptResult, Quota, Retention};
use orchestrator::state::machine::{IdempotencyRecord, RequestRecord};
use orchestrator::state::model::{
    ActiveEntry, Dag, DagSpec, NodeInfo, Notification, Run, RunType, StoredVersion, TaskKind,
    TaskSpec, Window,
};
use orchestrator::state::{Batch, Command, IdempotencyKey, Request, Table};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The protocol versions with a fixture folder; the last is what `write_fixtures` writes.
const VERSIONS: [&str; 4] = ["v2", "v5", "v8", "v11"];

fn dir(version: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/protocol")
        .join(version)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[derive(Serialize, Deserialize)]
struct SnapshotFixture {
    meta: SnapshotMeta,
    data_hex: String,
    digest: String,
}

/// `table name → [(key hex, value)]`; values that are JSON are kept as JSON, the rest hex.
type Tables = BTreeMap<String, Vec<(String, Value)>>;

fn spec(dag_id: &str, webhook: bool) -> DagSpec {
    let task = |id: &str, deps: &[&str]| TaskSpec {
        task_id: id.into(),
        kind: TaskKind::Noop,
        depends_on: deps.iter().map(|d| d.to_string()).collect(),
        retries: 1,
        retry_delay_ms: 100,
        retry_exponential: true,
        max_retry_delay_ms: 1_000,
        timeout_ms: Some(60_000),
    };
    DagSpec {
        dag_id: dag_id.into(),
        schedule: Some("0 2 * * *".into()),
        timezone: "Europe/Berlin".into(),
        owner: Some("team-data".into()),
        catchup: false,
        max_active_runs: 1,
        sla_ms: Some(1_000),
        paused: false,
        start_date_ms: Some(0),
        end_date_ms: None,
        webhook: webhook.then(|| "http://127.0.0.1:1/hook".to_string()),
        tasks: vec![task("extract", &[]), task("load", &["extract"])],
    }
}

/// A heartbeat of `node` (4 slots, a 10 s lease) reporting `running`.
fn heartbeat(node: u64, incarnation: &str, running: Vec<AttemptRef>) -> Command {
    Command::Heartbeat {
        node,
        incarnation: incarnation.into(),
        slots: 4,
        running,
        lease_ms: 10_000,
    }
}

/// The idempotency key `k` of tenant acme, as a request carries it.
fn acme_key(k: &str) -> IdempotencyKey {
    IdempotencyKey {
        tenant: "acme".into(),
        key: k.into(),
        fingerprint: format!("fp-{k}"),
    }
}

fn attempt(run: &str, task: &str, n: u32) -> AttemptRef {
    AttemptRef {
        run_id: run.into(),
        task_id: task.into(),
        attempt: n,
    }
}

/// The scenario of `version`: protocol-1 traffic, the raise to 2, then protocol-2 traffic
/// that leaves something in every table; for v5, then the raise to 5 and its traffic.
fn scenario(version: &str) -> Vec<Entry> {
    let mut seq = 0u64;
    let mut req = |now: i64, command: Command, idem: Option<&str>| {
        seq += 1;
        Request {
            request_id: format!("req-{seq:04}"),
            proposed_at_ms: now,
            idempotency: idem.map(acme_key),
            command,
            subject: None,
            quota: None,
            shell_scope: false,
        }
    };
    let w = |d: i64| Window {
        start_ms: d * 86_400_000,
        end_ms: (d + 1) * 86_400_000,
    };
    let hb = |node: u64, running: Vec<AttemptRef>| heartbeat(node, &format!("inc-{node}"), running);
    let put = |d: &str, hook: bool| Command::PutDag {
        tenant: "acme".into(),
        spec: spec(d, hook),
        expected_version: None,
    };
    let t0 = 1_764_000_000_000i64;
    let batches: Vec<(u64, Vec<Request>)> = vec![
        // Protocol 1.
        (
            1,
            vec![req(t0, hb(1, vec![]), None), req(t0, hb(2, vec![]), None)],
        ),
        (
            1,
            vec![
                req(t0 + 10, put("sales", true), Some("k-put")),
                req(t0 + 11, put("audit", false), None),
            ],
        ),
        (
            1,
            vec![req(
                t0 + 20,
                Command::TriggerRun {
                    tenant: "acme".into(),
                    dag_id: "sales".into(),
                    run_type: RunType::Backfill,
                    window: w(1),
                },
                Some("k-run"),
            )],
        ),
        (
            1,
            vec![req(
                t0 + 30,
                Command::FinishAttempt {
                    attempt: attempt("run_1", "extract", 1),
                    node: 1,
                    result: AttemptResult::Success { exit_code: Some(0) },
                },
                None,
            )],
        ),
        (
            1,
            vec![req(
                t0 + 40,
                Command::FireWindow {
                    tenant: "acme".into(),
                    dag_id: "audit".into(),
                    window: w(2),
                    term: 1,
                },
                None,
            )],
        ),
        // The raise, then protocol 2 with a stale stamp among them.
        (
            2,
            vec![req(
                t0 + 50,
                Command::RaiseProtocol {
                    term: 2,
                    version: 2,
                },
                None,
            )],
        ),
        (
            2,
            vec![
                req(t0 + 60, hb(1, vec![attempt("run_1", "load", 1)]), None),
                req(t0 + 55, hb(2, vec![]), None),
            ],
        ),
        (
            2,
            vec![req(
                t0 + 70,
                Command::FinishAttempt {
                    attempt: attempt("run_1", "load", 1),
                    node: 1,
                    result: AttemptResult::Failed {
                        exit_code: Some(3),
                        error: "exit 3".into(),
                    },
                },
                None,
            )],
        ),
        (
            2,
            vec![req(t0 + 2_000, Command::Supervise { term: 2 }, None)],
        ),
        (
            2,
            vec![req(
                t0 + 2_100,
                Command::SetPaused {
                    tenant: "acme".into(),
                    dag_id: "audit".into(),
                    paused: true,
                },
                None,
            )],
        ),
        (
            2,
            vec![req(
                t0 + 2_200,
                Command::TriggerRun {
                    tenant: "acme".into(),
                    dag_id: "sales".into(),
                    run_type: RunType::Manual,
                    window: w(3),
                },
                None,
            )],
        ),
        (
            2,
            vec![req(
                t0 + 2_300,
                Command::CancelRun {
                    tenant: "acme".into(),
                    run_id: "run_3".into(),
                },
                None,
            )],
        ),
        (
            2,
            vec![req(
                t0 + 2_400,
                Command::RetryRun {
                    tenant: "acme".into(),
                    run_id: "run_3".into(),
                },
                None,
            )],
        ),
        (
            2,
            vec![req(
                t0 + 2_500,
                Command::FinishAttempt {
                    attempt: attempt("run_3", "extract", 1),
                    node: 1,
                    result: AttemptResult::Lost {
                        error: "gone".into(),
                    },
                },
                None,
            )],
        ),
        (
            2,
            vec![req(
                t0 + 2_550,
                Command::FinishAttempt {
                    attempt: attempt("run_1", "load", 2),
                    node: 2,
                    result: AttemptResult::TimedOut {
                        error: "timed out".into(),
                    },
                },
                None,
            )],
        ),
        (
            2,
            vec![req(
                t0 + 2_600,
                Command::AckNotifications {
                    keys: vec!["run_1\0sla_miss".into()],
                },
                None,
            )],
        ),
        (
            2,
            vec![req(
                t0 + 2_700,
                Command::DeleteDag {
                    tenant: "acme".into(),
                    dag_id: "audit".into(),
                },
                None,
            )],
        ),
        (
            2,
            vec![req(
                t0 + 2_800,
                Command::Purge {
                    term: 2,
                    before_ms: t0,
                    records_before_ms: t0,
                    keep: Some(Retention {
                        runs_ms: 86_400_000,
                        records_ms: 86_400_000,
                    }),
                },
                None,
            )],
        ),
        (2, vec![req(t0 + 2_900, put("audit", false), None)]),
    ];
    let mut batches = batches;
    let protocol: u32 = version[1..]
        .parse()
        .expect("a fixture version is v<number>");
    if protocol >= 5 {
        batches.extend(protocol_5_batches(t0 + 3_000));
    }
    if protocol >= 8 {
        batches.extend(protocol_8_batches(t0 + 4_000));
    }
    if protocol >= 11 {
        batches.extend(protocol_11_batches(t0 + 5_000));
    }
    let member = |id: u64| Member {
        api_addr: format!("10.0.0.{id}:8080"),
        peer_addr: format!("10.0.0.{id}:9080"),
        disk: None,
    };
    let mut log = vec![Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
        payload: EntryPayload::Membership(Membership::new(
            vec![[1u64, 2, 3].into_iter().collect()],
            (1..=3)
                .map(|id| (id, member(id)))
                .collect::<BTreeMap<_, _>>(),
        )),
    }];
    log.push(Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), 2),
        payload: EntryPayload::Blank,
    });
    for (term, requests) in batches {
        let index = log.len() as u64 + 1;
        log.push(Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(Batch { requests }),
        });
    }
    log
}

/// After the v2 scenario: the raise to 5, then a DAG refused by the DAG quota, two manual
/// runs without a window in one millisecond (two runs), and two updates, the second of
/// which drops the version behind it but not the one the new runs execute (all with a
/// subject and a quota keeping one version).
fn protocol_5_batches(t: i64) -> Vec<(u64, Vec<Request>)> {
    let quota = Quota {
        max_dags: 2,
        max_active_runs: 100,
        max_queued_runs_per_dag: 10,
        dag_versions_kept: 1,
        slot_share_percent: None,
    };
    let mut seq = 0u64;
    let mut req = |now: i64, command: Command| {
        seq += 1;
        Request {
            request_id: format!("req-5-{seq:04}"),
            proposed_at_ms: now,
            idempotency: None,
            command,
            subject: Some("alice@acme".into()),
            quota: Some(quota),
            shell_scope: false,
        }
    };
    let manual = || Command::TriggerRun {
        tenant: "acme".into(),
        dag_id: "sales".into(),
        run_type: RunType::Manual,
        window: Window {
            start_ms: t,
            end_ms: t,
        },
    };
    let update = |owner: &str| {
        let mut s = spec("sales", true);
        s.owner = Some(owner.into());
        Command::PutDag {
            tenant: "acme".into(),
            spec: s,
            expected_version: None,
        }
    };
    vec![
        (
            3,
            vec![req(
                t,
                Command::RaiseProtocol {
                    term: 3,
                    version: 5,
                },
            )],
        ),
        (
            3,
            vec![req(
                t + 10,
                Command::PutDag {
                    tenant: "acme".into(),
                    spec: spec("third", false),
                    expected_version: None,
                },
            )],
        ),
        (3, vec![req(t + 20, manual()), req(t + 20, manual())]),
        (3, vec![req(t + 30, update("team-finance"))]),
        (3, vec![req(t + 40, update("team-ops"))]),
    ]
}

/// After the v5 scenario: the raise to 8, then a second tenant whose two runs of four
/// parallel tasks meet a 50 % slot share of the two nodes' eight slots (placed by a
/// supervise pass, one handed on when an attempt finishes), a retry counted against the
/// run quota, a DAG deleted while a run still executes it, a queued run cancelled, and a
/// restarted node whose lost attempts are placed again.
fn protocol_8_batches(t: i64) -> Vec<(u64, Vec<Request>)> {
    let quota = Quota {
        max_dags: 10,
        max_active_runs: 100,
        max_queued_runs_per_dag: 10,
        dag_versions_kept: 2,
        slot_share_percent: Some(50),
    };
    let mut seq = 0u64;
    let mut req = |now: i64, subject: Option<&str>, command: Command| {
        seq += 1;
        Request {
            request_id: format!("req-8-{seq:04}"),
            proposed_at_ms: now,
            idempotency: None,
            command,
            subject: subject.map(str::to_string),
            quota: subject.map(|_| quota),
            shell_scope: false,
        }
    };
    let hb = heartbeat;
    let attempt = |run: &str, task: &str| attempt(run, task, 1);
    let mut wide = spec("ingest", false);
    wide.max_active_runs = 4;
    wide.tasks = ["a", "b", "c", "d"]
        .iter()
        .map(|id| TaskSpec {
            task_id: id.to_string(),
            depends_on: Vec::new(),
            ..wide.tasks[0].clone()
        })
        .collect();
    let manual = || Command::TriggerRun {
        tenant: "globex".into(),
        dag_id: "ingest".into(),
        run_type: RunType::Manual,
        window: Window {
            start_ms: t + 20,
            end_ms: t + 20,
        },
    };
    let bob = Some("bob@globex");
    let alice = Some("alice@acme");
    vec![
        (
            4,
            vec![req(
                t,
                None,
                Command::RaiseProtocol {
                    term: 4,
                    version: 8,
                },
            )],
        ),
        (
            4,
            vec![
                req(
                    t + 10,
                    None,
                    hb(1, "inc-1", vec![attempt("run_3", "extract")]),
                ),
                req(
                    t + 10,
                    None,
                    hb(2, "inc-2", vec![attempt("run_2", "extract")]),
                ),
            ],
        ),
        (
            4,
            vec![req(
                t + 15,
                bob,
                Command::PutDag {
                    tenant: "globex".into(),
                    spec: wide,
                    expected_version: None,
                },
            )],
        ),
        (
            4,
            vec![req(t + 20, bob, manual()), req(t + 20, bob, manual())],
        ),
        (4, vec![req(t + 30, None, Command::Supervise { term: 4 })]),
        (
            4,
            vec![req(
                t + 40,
                None,
                Command::FinishAttempt {
                    attempt: attempt("run_6", "a"),
                    node: 1,
                    result: AttemptResult::Success { exit_code: None },
                },
            )],
        ),
        (
            4,
            vec![req(
                t + 50,
                alice,
                Command::RetryRun {
                    tenant: "acme".into(),
                    run_id: "run_1".into(),
                },
            )],
        ),
        (
            4,
            vec![req(
                t + 60,
                alice,
                Command::DeleteDag {
                    tenant: "acme".into(),
                    dag_id: "audit".into(),
                },
            )],
        ),
        (
            4,
            vec![req(
                t + 65,
                alice,
                Command::CancelRun {
                    tenant: "acme".into(),
                    run_id: "run_5".into(),
                },
            )],
        ),
        (4, vec![req(t + 70, None, hb(2, "inc-2-restarted", vec![]))]),
    ]
}

/// After the v8 scenario: a shell DAG stored at protocol 8 (no capability in apply yet),
/// the raise to 11 (which grants it, by nobody), a shell DAG from a writer holding
/// `orchestrator:shell` under an idempotency key (granted to its subject, the record
/// indexed by time), one from a writer without it under another key (refused, the key
/// left free), a pause carrying the grant to the next version, a run of the granted DAG
/// placed by a supervise pass, and a purge past the first records that reads the time
/// index.
fn protocol_11_batches(t: i64) -> Vec<(u64, Vec<Request>)> {
    let quota = Quota {
        max_dags: 10,
        max_active_runs: 100,
        max_queued_runs_per_dag: 10,
        dag_versions_kept: 2,
        slot_share_percent: Some(50),
    };
    let mut seq = 0u64;
    let mut req = |now: i64, shell_scope: bool, idem: Option<&str>, command: Command| {
        seq += 1;
        Request {
            request_id: format!("req-11-{seq:04}"),
            proposed_at_ms: now,
            idempotency: idem.map(acme_key),
            command,
            subject: Some("carol@acme".into()),
            quota: Some(quota),
            shell_scope,
        }
    };
    let shell = |dag_id: &str| {
        let mut s = spec(dag_id, false);
        s.schedule = None;
        s.tasks[1].kind = TaskKind::Shell {
            command: "echo {{ run_id }}".into(),
        };
        Command::PutDag {
            tenant: "acme".into(),
            spec: s,
            expected_version: None,
        }
    };
    vec![
        (5, vec![req(t, false, None, shell("legacy"))]),
        (
            5,
            vec![req(
                t + 10,
                false,
                None,
                Command::RaiseProtocol {
                    term: 5,
                    version: 11,
                },
            )],
        ),
        (
            5,
            vec![
                req(t + 20, true, Some("k-granted"), shell("granted")),
                req(t + 20, false, Some("k-refused"), shell("refused")),
            ],
        ),
        (
            5,
            vec![req(
                t + 30,
                false,
                None,
                Command::SetPaused {
                    tenant: "acme".into(),
                    dag_id: "granted".into(),
                    paused: true,
                },
            )],
        ),
        (
            5,
            vec![req(
                t + 40,
                false,
                None,
                Command::TriggerRun {
                    tenant: "acme".into(),
                    dag_id: "granted".into(),
                    run_type: RunType::Manual,
                    window: Window {
                        start_ms: t + 40,
                        end_ms: t + 40,
                    },
                },
            )],
        ),
        (
            5,
            vec![req(t + 50, false, None, Command::Supervise { term: 5 })],
        ),
        (
            5,
            vec![req(
                t + 60,
                false,
                None,
                Command::Purge {
                    term: 5,
                    before_ms: t - 86_400_000,
                    records_before_ms: t + 15,
                    keep: Some(Retention {
                        runs_ms: 86_400_000,
                        records_ms: 45,
                    }),
                },
            )],
        ),
    ]
}

fn fresh() -> (tempfile::TempDir, Db, StateMachineStore) {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = Db::open(dir.path()).expect("open db");
    let sm = StateMachineStore::new(db.clone()).expect("open state machine");
    (dir, db, sm)
}

/// Decode one table value into its type; returns the value as JSON (or hex for the raw
/// ones), failing with the table and key on anything that does not decode.
fn decode(table: Table, key: &[u8], v: &[u8]) -> Value {
    fn json<T: serde::de::DeserializeOwned + Serialize>(t: Table, k: &[u8], v: &[u8]) -> Value {
        let parsed: T = serde_json::from_slice(v).unwrap_or_else(|e| {
            panic!("{t:?} value at key {} does not decode: {e}", hex::encode(k))
        });
        serde_json::to_value(parsed).expect("re-encodes")
    }
    match table {
        Table::Dags => json::<Dag>(table, key, v),
        Table::DagVersions => json::<StoredVersion>(table, key, v),
        Table::Runs => json::<Run>(table, key, v),
        Table::ActiveRuns => json::<ActiveEntry>(table, key, v),
        Table::Nodes => json::<NodeInfo>(table, key, v),
        Table::Notifications => json::<Notification>(table, key, v),
        // From protocol 10 these tables also hold their records' time index: a key
        // starting with NUL, an empty value.
        Table::Idempotency | Table::Requests if key.first() == Some(&0) => {
            assert!(v.is_empty(), "{table:?} time-index values are empty");
            Value::String(String::new())
        }
        Table::Idempotency => json::<IdempotencyRecord>(table, key, v),
        Table::Requests => json::<RequestRecord>(table, key, v),
        Table::RunsByDag | Table::RunsByTenant | Table::FinishedRuns => {
            assert!(v.is_empty(), "{table:?} index values are empty");
            Value::String(String::new())
        }
        Table::Windows => Value::String(
            String::from_utf8(v.to_vec()).unwrap_or_else(|_| panic!("window run id is utf-8")),
        ),
        Table::Assignments | Table::Cursors | Table::Counters => {
            assert!(
                v.len() == 4 || v.len() == 8,
                "{table:?} holds a be u32/u64/i64, found {} bytes",
                v.len()
            );
            Value::String(hex::encode(v))
        }
    }
}

fn read_tables(db: &Db) -> Tables {
    Table::ALL
        .iter()
        .map(|t| {
            let rows = db
                .scan_prefix(*t, b"", None, usize::MAX)
                .expect("scan")
                .into_iter()
                .map(|(k, v)| (hex::encode(&k), decode(*t, &k, &v)))
                .collect();
            (t.name().to_string(), rows)
        })
        .collect()
}

fn load<T: serde::de::DeserializeOwned>(version: &str, name: &str) -> T {
    let path = dir(version).join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("fixture {} missing: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("fixture {name} does not decode: {e}"))
}

#[test]
fn every_recorded_log_applies_to_its_recorded_state() {
    for version in VERSIONS {
        let log: Vec<Entry> = load(version, "log.json");
        let snap: SnapshotFixture = load(version, "snapshot.json");
        let (_d, db, mut sm) = fresh();
        rt().block_on(async { sm.apply(log).await.expect("the log applies") });
        assert_eq!(
            db.state_digest().expect("digest"),
            snap.digest,
            "{version}: applying the recorded log must give the recorded state: a change of \
             apply behaviour must wait for a protocol raise, and new fields must not change \
             old bytes"
        );
        let tables: Tables = load(version, "tables.json");
        assert_eq!(
            read_tables(&db),
            tables,
            "{version}: every table, value by value"
        );
    }
}

#[test]
fn every_recorded_snapshot_installs_and_every_table_decodes() {
    for version in VERSIONS {
        let snap: SnapshotFixture = load(version, "snapshot.json");
        let data = hex::decode(&snap.data_hex).expect("snapshot data is hex");
        let (_d, db, mut sm) = fresh();
        rt().block_on(async {
            let mut file = tempfile::tempfile().expect("a temp file");
            std::io::Write::write_all(&mut file, &data).expect("write the snapshot");
            sm.install_snapshot(&snap.meta, Box::new(tokio::fs::File::from_std(file)))
                .await
                .expect("the snapshot installs")
        });
        assert_eq!(db.state_digest().expect("digest"), snap.digest, "{version}");
        let tables: Tables = load(version, "tables.json");
        for t in Table::ALL {
            let rows = tables
                .get(t.name())
                .unwrap_or_else(|| panic!("{version}: table {} recorded", t.name()));
            assert!(!rows.is_empty(), "{version} exercises table {}", t.name());
        }
        assert_eq!(read_tables(&db), tables, "{version}");
    }
}

/// What the v5 log shows of protocols 3 to 5, read from its recorded tables.
#[test]
fn the_v5_log_records_what_protocols_3_to_5_added() {
    let tables: Tables = load("v5", "tables.json");
    let rows = |t: Table| tables.get(t.name()).cloned().unwrap_or_default();
    let outcomes: Vec<Value> = rows(Table::Requests)
        .into_iter()
        .map(|(_, v)| v["outcome"].clone())
        .collect();
    assert!(
        outcomes.iter().any(|o| o["outcome"] == "quota_exceeded"
            && o["message"]
                .as_str()
                .unwrap_or("")
                .contains("max_dags_per_tenant")),
        "a DAG refused by the quota: {outcomes:?}"
    );
    let manual: Vec<Value> = rows(Table::Runs)
        .into_iter()
        .map(|(_, v)| v)
        .filter(|r| r["run_type"] == "manual" && r["triggered_by"] == "alice@acme")
        .collect();
    assert_eq!(manual.len(), 2, "two windowless runs in one millisecond");
    let sales_versions: Vec<u64> = rows(Table::DagVersions)
        .iter()
        .filter(|(_, v)| v["dag_id"] == "sales")
        .filter_map(|(k, _)| {
            let key = hex::decode(k).ok()?;
            Some(u64::from_be_bytes(
                key.get(key.len().checked_sub(8)?..)?.try_into().ok()?,
            ))
        })
        .collect();
    assert_eq!(
        sales_versions,
        vec![1, 3],
        "version 2 dropped; version 1 kept while the manual runs execute it"
    );
}

/// What the v8 log shows of protocols 6 to 8, read from its recorded tables.
#[test]
fn the_v8_log_records_what_protocols_6_to_8_added() {
    let tables: Tables = load("v8", "tables.json");
    let rows = |t: Table| tables.get(t.name()).cloned().unwrap_or_default();
    let runs: BTreeMap<String, Value> = rows(Table::Runs)
        .into_iter()
        .map(|(_, v)| (v["run_id"].as_str().unwrap_or_default().to_string(), v))
        .collect();
    // Assignments: key = node (8 bytes be) 0 run_id 0 task_id, value = attempt.
    let assigned: Vec<(u64, String, String, u32)> = rows(Table::Assignments)
        .into_iter()
        .map(|(k, v)| {
            let key = hex::decode(k).expect("hex key");
            let node = u64::from_be_bytes(key[..8].try_into().expect("node id"));
            let mut parts = key[9..].split(|b| *b == 0);
            let mut text = || String::from_utf8(parts.next().unwrap_or_default().to_vec()).unwrap();
            let (run, task) = (text(), text());
            let attempt = u32::from_str_radix(v.as_str().unwrap_or_default(), 16).unwrap();
            (node, run, task, attempt)
        })
        .collect();
    let tenant_of = |run: &str| runs[run]["tenant"].as_str().unwrap_or_default().to_string();
    let globex = assigned
        .iter()
        .filter(|a| tenant_of(&a.1) == "globex")
        .count();
    // Protocol 8: two nodes of 4 slots, a 50 % share: globex holds 4 though 2 slots are
    // free and 3 of its tasks wait.
    assert_eq!(globex, 4, "{assigned:?}");
    assert_eq!(assigned.len(), 6, "{assigned:?}");
    let waiting = runs["run_7"]["tasks"]
        .as_object()
        .expect("tasks")
        .values()
        .filter(|t| t["state"] == "queued")
        .count();
    assert_eq!(waiting, 3);
    // The slot run_6's `a` freed on node 1 went to run_7's `a` when the finish applied
    // (the restart of node 2, later, emptied the other node).
    assert!(
        assigned.contains(&(1, "run_7".into(), "a".into(), 1)),
        "{assigned:?}"
    );
    // The restarted node's attempts were lost and placed again (attempt 2).
    for task in ["b", "d"] {
        assert!(
            assigned
                .iter()
                .any(|a| a.1 == "run_6" && a.2 == task && a.3 == 2),
            "{assigned:?}"
        );
    }
    // Runs keep the share they were created (or retried) with; older runs have none.
    assert_eq!(runs["run_6"]["slot_share_percent"], 50);
    assert_eq!(runs["run_1"]["slot_share_percent"], 50, "the retry set it");
    assert!(runs["run_3"].get("slot_share_percent").is_none());
    // Protocol 7: a deleted DAG keeps a tombstone without its tasks.
    let audit = rows(Table::Dags)
        .into_iter()
        .map(|(_, v)| v)
        .find(|d| d["spec"]["dag_id"] == "audit")
        .expect("audit's record");
    assert_eq!(audit["deleted"], true);
    assert_eq!(audit["spec"]["tasks"], serde_json::json!([]));
}

/// What the v11 log shows of protocols 9 to 11, read from its recorded tables.
#[test]
fn the_v11_log_records_what_protocols_9_to_11_added() {
    let tables: Tables = load("v11", "tables.json");
    let rows = |t: Table| tables.get(t.name()).cloned().unwrap_or_default();
    let text_key =
        |k: &str| String::from_utf8_lossy(&hex::decode(k).expect("hex key")).into_owned();
    // Protocol 11: every shell version carries a grant: by nobody for the one stored
    // before the raise, by the writer for the one written with the scope, carried to
    // the version its pause made; the one written without the scope was never stored.
    let grants: BTreeMap<(String, u64), Value> = rows(Table::DagVersions)
        .into_iter()
        .filter(|(_, v)| {
            ["legacy", "granted", "refused"].contains(&v["dag_id"].as_str().unwrap_or(""))
        })
        .map(|(k, v)| {
            let key = hex::decode(&k).expect("hex key");
            let version = u64::from_be_bytes(key[key.len() - 8..].try_into().expect("version"));
            let dag = v["dag_id"].as_str().unwrap_or_default().to_string();
            ((dag, version), v["shell_grant"].clone())
        })
        .collect();
    let by = |who: Option<&str>| serde_json::json!({ "by": who });
    let expected: BTreeMap<(String, u64), Value> = [
        (("granted".to_string(), 1), by(Some("carol@acme"))),
        (("granted".to_string(), 2), by(Some("carol@acme"))),
        (("legacy".to_string(), 1), by(None)),
    ]
    .into_iter()
    .collect();
    assert_eq!(grants, expected);
    let requests = rows(Table::Requests);
    assert!(
        requests
            .iter()
            .any(|(_, v)| v["outcome"]["outcome"] == "forbidden"),
        "the shell DAG without the scope refused: {requests:?}"
    );
    let keys: Vec<String> = rows(Table::Idempotency)
        .iter()
        .map(|(k, _)| text_key(k))
        .collect();
    assert!(keys.iter().any(|k| k.ends_with("k-granted")), "{keys:?}");
    assert!(
        !keys.iter().any(|k| k.contains("k-refused")),
        "a refused capability keeps no answer under its key: {keys:?}"
    );
    // Protocol 10: records indexed by time, and the purge past the raise removed every
    // record created before its cutoff (t + 15), indexed or not.
    let cutoff = 1_764_000_005_015i64;
    let (index, records): (Vec<_>, Vec<_>) =
        requests.iter().partition(|(k, _)| k.starts_with("00"));
    assert!(!index.is_empty() && !records.is_empty());
    for (k, v) in &records {
        assert!(
            v["created_ms"].as_i64().is_some_and(|c| c >= cutoff),
            "request {} outlived the purge: {v}",
            text_key(k)
        );
    }
}

/// Writes the fixtures of this version (run only when adding a new version's folder).
#[test]
#[ignore]
fn write_fixtures() {
    let version = VERSIONS[VERSIONS.len() - 1];
    assert!(
        !dir(version).exists(),
        "{} exists: fixtures of a released protocol are never rewritten",
        dir(version).display()
    );
    let log = scenario(version);
    let (_d, db, mut sm) = fresh();
    let (snap, data) = rt().block_on(async {
        use tokio::io::AsyncReadExt;
        sm.apply(log.clone()).await.expect("scenario applies");
        let mut snap = sm.build_snapshot().await.expect("snapshot");
        let mut data = Vec::new();
        snap.snapshot
            .read_to_end(&mut data)
            .await
            .expect("read the snapshot");
        (snap, data)
    });
    let fixture = SnapshotFixture {
        meta: snap.meta,
        data_hex: hex::encode(data),
        digest: db.state_digest().expect("digest"),
    };
    std::fs::create_dir_all(dir(version)).expect("fixture dir");
    let write = |name: &str, v: &dyn erased::Json| {
        std::fs::write(dir(version).join(name), v.pretty()).expect("write fixture")
    };
    write("log.json", &log);
    write("snapshot.json", &fixture);
    write("tables.json", &read_tables(&db));
}

/// Pretty JSON of any serialisable value behind one `dyn` (for the writer above).
mod erased {
    pub trait Json {
        fn pretty(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn pretty(&self) -> String {
            serde_json::to_string_pretty(self).expect("fixtures serialise") + "\n"
        }
    }
}

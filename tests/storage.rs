//! Storage (issue 2): the Raft log store and state machine on real RocksDB in temp dirs.
//! openraft's own storage conformance suite, apply determinism (property test), snapshot
//! round trip, and log append/truncate/purge semantics across a reopen.

use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, EntryPayload, RaftLogReader, RaftSnapshotBuilder};
use orchestrator::raft::db::Db;
use orchestrator::raft::log_store::LogStore;
use orchestrator::raft::state_machine::StateMachineStore;
use orchestrator::raft::types::{Entry, LogId, StorageError, TypeConfig};
use orchestrator::raft::NodeId;
use orchestrator::state::model::{DagSpec, RunType, TaskKind, TaskSpec, Window};
use orchestrator::state::{Batch, Command, IdempotencyKey, Request, Table};
use proptest::prelude::*;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = Db::open(dir.path()).expect("open db");
        Ok((dir, LogStore::new(db.clone()), StateMachineStore::new(db)?))
    }
}

#[test]
fn openraft_storage_conformance_suite() {
    Suite::test_all(Builder).expect("openraft's storage suite passes");
}

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1 as NodeId), index)
}

fn entry(term: u64, index: u64, requests: Vec<Request>) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(Batch { requests }),
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn log_append_truncate_purge_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        {
            let mut log = LogStore::new(Db::open(dir.path()).unwrap());
            let entries: Vec<Entry> = (1..=10).map(|i| entry(1, i, vec![])).collect();
            log.blocking_append(entries).await.unwrap();
            log.truncate(log_id(1, 6)).await.unwrap();
            log.purge(log_id(1, 3)).await.unwrap();
            let st = log.get_log_state().await.unwrap();
            assert_eq!(st.last_purged_log_id, Some(log_id(1, 3)));
            assert_eq!(st.last_log_id, Some(log_id(1, 5)));
        }
        // Reopen: the same state comes back from disk. The purge's background compaction
        // holds the database until it ends, so the reopen waits for the lock (bounded).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let db = loop {
            match Db::open(dir.path()) {
                Ok(db) => break db,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => panic!("reopen: {e}"),
            }
        };
        let mut log = LogStore::new(db);
        let st = log.get_log_state().await.unwrap();
        assert_eq!(st.last_purged_log_id, Some(log_id(1, 3)));
        assert_eq!(st.last_log_id, Some(log_id(1, 5)));
        let got: Vec<u64> = log
            .try_get_log_entries(0..100)
            .await
            .unwrap()
            .iter()
            .map(|e| e.log_id.index)
            .collect();
        assert_eq!(got, vec![4, 5]);
        // Appending after a purge of everything keeps the purge pointer as the last id.
        log.purge(log_id(1, 5)).await.unwrap();
        let st = log.get_log_state().await.unwrap();
        assert_eq!(st.last_log_id, Some(log_id(1, 5)));
        assert!(log.try_get_log_entries(0..100).await.unwrap().is_empty());
    });
}

fn spec(dag_id: &str, owner: &str) -> DagSpec {
    DagSpec {
        dag_id: dag_id.into(),
        schedule: None,
        timezone: "UTC".into(),
        owner: Some(owner.into()),
        catchup: false,
        max_active_runs: 4,
        sla_ms: Some(1000),
        paused: false,
        start_date_ms: None,
        end_date_ms: None,
        webhook: None,
        tasks: vec![TaskSpec {
            task_id: "t".into(),
            kind: TaskKind::Noop,
            depends_on: vec![],
            retries: 1,
            retry_delay_ms: 10,
            retry_exponential: true,
            max_retry_delay_ms: 100,
            timeout_ms: None,
        }],
    }
}

/// A random but meaningful request: DAG puts and run triggers over 2 tenants, 3 DAGs,
/// small windows (so duplicates happen), reused request ids and idempotency keys.
fn arb_request() -> impl Strategy<Value = Request> {
    (
        0u8..2,
        0u8..3,
        0i64..4,
        0u8..3,
        0u8..6,
        any::<bool>(),
        0u8..4,
        0u8..3,
    )
        .prop_map(
            |(tenant, dag, window, owner, rid, is_put, idem, expected)| {
                let tenant = format!("t{tenant}");
                let dag_id = format!("d{dag}");
                let command = if is_put {
                    Command::PutDag {
                        tenant: tenant.clone(),
                        spec: spec(&dag_id, &format!("o{owner}")),
                        expected_version: (expected > 0).then(|| expected as u64 - 1),
                    }
                } else {
                    Command::TriggerRun {
                        tenant: tenant.clone(),
                        dag_id,
                        run_type: RunType::Backfill,
                        window: Window {
                            start_ms: window * 10,
                            end_ms: window * 10 + 10,
                        },
                    }
                };
                Request {
                    request_id: format!("r{rid}-{is_put}-{window}"),
                    proposed_at_ms: 1_000 + window,
                    idempotency: (idem > 0).then(|| IdempotencyKey {
                        tenant,
                        key: format!("k{idem}"),
                        fingerprint: format!("f{}", window % 2),
                    }),
                    command,
                    subject: None,
                    quota: None,
                    shell_scope: false,
                }
            },
        )
}

fn open_sm() -> (tempfile::TempDir, Db, StateMachineStore) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).unwrap();
    let sm = StateMachineStore::new(db.clone()).expect("open state machine");
    (dir, db, sm)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, .. ProptestConfig::default() })]

    /// The same log applied to two fresh state machines, in different apply-call splits,
    /// gives identical responses and identical state digests.
    #[test]
    fn apply_is_deterministic(reqs in prop::collection::vec(arb_request(), 1..40), split in 1usize..8) {
        let rt = rt();
        let (_d1, db1, mut sm1) = open_sm();
        let (_d2, db2, mut sm2) = open_sm();
        let entries: Vec<Entry> = reqs
            .chunks(3)
            .enumerate()
            .map(|(i, c)| entry(1, i as u64 + 1, c.to_vec()))
            .collect();
        let (r1, r2) = rt.block_on(async {
            let r1 = sm1.apply(entries.clone()).await.unwrap();
            let mut r2 = Vec::new();
            for chunk in entries.chunks(split) {
                r2.extend(sm2.apply(chunk.to_vec()).await.unwrap());
            }
            (r1, r2)
        });
        prop_assert_eq!(r1, r2);
        prop_assert_eq!(db1.state_digest().unwrap(), db2.state_digest().unwrap());
    }
}

#[test]
fn snapshot_install_replaces_the_whole_state() {
    let rt = rt();
    let (_d1, db1, mut sm1) = open_sm();
    let (_d2, db2, mut sm2) = open_sm();
    rt.block_on(async {
        let put = |t: &str, d: &str, id: &str| Request {
            request_id: id.into(),
            proposed_at_ms: 5,
            idempotency: None,
            command: Command::PutDag {
                tenant: t.into(),
                spec: spec(d, "o"),
                expected_version: None,
            },
            subject: None,
            quota: None,
            shell_scope: false,
        };
        sm1.apply(vec![entry(
            1,
            1,
            vec![put("a", "d1", "x1"), put("a", "d2", "x2")],
        )])
        .await
        .unwrap();
        // sm2 holds state the snapshot does not have: it must disappear.
        sm2.apply(vec![entry(1, 1, vec![put("b", "stale", "y1")])])
            .await
            .unwrap();
        let snap = sm1.build_snapshot().await.unwrap();
        assert_eq!(snap.meta.last_log_id, Some(log_id(1, 1)));
        sm2.install_snapshot(&snap.meta, snap.snapshot)
            .await
            .unwrap();
        assert_eq!(db1.state_digest().unwrap(), db2.state_digest().unwrap());
        let (applied, _) = sm2.applied_state().await.unwrap();
        assert_eq!(applied, Some(log_id(1, 1)));
        let current = sm2
            .get_current_snapshot()
            .await
            .unwrap()
            .expect("stored snapshot");
        assert_eq!(current.meta.last_log_id, Some(log_id(1, 1)));
    });
}

#[test]
fn snapshots_are_files_and_one_kept_the_old_way_becomes_one_at_start_and_a_lost_one_is_forgotten() {
    use orchestrator::raft::db::CF_SNAPSHOT;
    use tokio::io::AsyncReadExt;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).unwrap();
    let mut sm = StateMachineStore::new(db.clone()).unwrap();
    let snapshot_files = || -> Vec<String> {
        std::fs::read_dir(dir.path().join("snapshots"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    let read = |mut s: Box<tokio::fs::File>| {
        rt.block_on(async move {
            let mut v = Vec::new();
            s.read_to_end(&mut v).await.unwrap();
            v
        })
    };
    let meta = rt.block_on(async {
        let put = |d: &str| Request {
            request_id: format!("r-{d}"),
            proposed_at_ms: 5,
            idempotency: None,
            command: Command::PutDag {
                tenant: "a".into(),
                spec: spec(d, "o"),
                expected_version: None,
            },
            subject: None,
            quota: None,
            shell_scope: false,
        };
        sm.apply(vec![entry(1, 1, vec![put("d1")])]).await.unwrap();
        sm.build_snapshot().await.unwrap();
        sm.apply(vec![entry(1, 2, vec![put("d2")])]).await.unwrap();
        sm.build_snapshot().await.unwrap().meta
    });
    // One file: the older snapshot went when the newer one became current.
    assert_eq!(snapshot_files().len(), 1, "{:?}", snapshot_files());
    let current = rt.block_on(sm.get_current_snapshot()).unwrap().unwrap();
    assert_eq!(current.meta, meta);
    let data = read(current.snapshot);
    let dags = orchestrator::raft::state_machine::parse_snapshot(&data)
        .unwrap()
        .into_iter()
        .filter(|(t, _, _)| *t == Table::Dags)
        .count();
    assert_eq!(dags, 2, "both DAGs");
    // A node of an earlier release kept its snapshot whole in RocksDB.
    drop(sm);
    for f in snapshot_files() {
        std::fs::remove_file(dir.path().join("snapshots").join(f)).unwrap();
    }
    let cf = db.cf(CF_SNAPSHOT).unwrap();
    let old_meta = serde_json::to_vec(&serde_json::json!({ "meta": meta })).unwrap();
    db.raw().put_cf(cf, b"meta", old_meta).unwrap();
    db.raw().put_cf(cf, b"data", &data).unwrap();
    let mut sm = StateMachineStore::new(db.clone()).unwrap();
    assert_eq!(snapshot_files().len(), 1, "moved into a file");
    assert_eq!(
        db.raw().get_cf(cf, b"data").unwrap(),
        None,
        "and out of RocksDB"
    );
    let current = rt.block_on(sm.get_current_snapshot()).unwrap().unwrap();
    assert_eq!(current.meta, meta);
    assert_eq!(read(current.snapshot), data);
    // A file that went missing does not stop the node from starting: the snapshot is
    // forgotten (openraft builds another where it needs one).
    drop(sm);
    for f in snapshot_files() {
        std::fs::remove_file(dir.path().join("snapshots").join(f)).unwrap();
    }
    let mut sm = StateMachineStore::new(db.clone()).expect("starts without the file");
    assert!(rt.block_on(sm.get_current_snapshot()).unwrap().is_none());
    assert_eq!(db.raw().get_cf(cf, b"meta").unwrap(), None);
}

#[test]
fn corrupt_snapshots_are_rejected() {
    use orchestrator::raft::state_machine::parse_snapshot;
    assert!(parse_snapshot(b"nope").is_err());
    assert!(parse_snapshot(b"ORCSNAP1\x00\x00\x00\x00\x09abc").is_err());
    assert!(parse_snapshot(b"ORCSNAP1\x63").is_err());
    assert_eq!(parse_snapshot(b"ORCSNAP1").unwrap().len(), 0);
}

#[test]
fn a_stored_run_that_does_not_decode_stops_the_state_machine_from_opening() {
    // The due index must hold every active run: a run it could not read would never be
    // supervised here while other replicas supervise it.
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).unwrap();
    let cf = db.cf(Table::Runs.name()).unwrap();
    db.raw().put_cf(cf, b"run_x", b"not json").unwrap();
    let err = StateMachineStore::new(db)
        .err()
        .expect("a run that does not decode is refused");
    assert!(err.to_string().contains("run_x"), "{err}");
}

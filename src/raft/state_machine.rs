//! openraft's state machine over RocksDB. `apply` runs [`crate::state::apply_request`]
//! for every request of every entry through an overlay with read-your-writes, then writes
//! the changed keys, `last_applied` and the membership in one atomic batch.
//! Snapshots are streamed from a RocksDB point-in-time view into a file while apply
//! continues ([`super::snapshot_store`]); installing one replaces every replicated table.
//! It also keeps the run/task census ([`crate::state::census`]) and the due index of the
//! supervise pass ([`crate::state::due`]) true as it writes runs, and records the apply batch size, run durations, task retries and snapshots as
//! metrics.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use rocksdb::{IteratorMode, WriteBatch};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::db::{Db, CF_SM_META, CF_SNAPSHOT};
use super::snapshot_store::{SnapshotFiles, SnapshotReader};
use super::types::{
    Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};
use crate::state::census::{self, Change, Counts, DagView, RunView, TenantCounts, Usage};
use crate::state::dag_changes::{DagChanges, DagsSince};
use crate::state::due::{DueIndex, Supervision};
use crate::state::model::Millis;
use crate::state::{apply_request, BatchResponse, Kv, KvError, Table};
use crate::telemetry::metrics as m;

const KEY_LAST_APPLIED: &[u8] = b"last_applied";
const KEY_MEMBERSHIP: &[u8] = b"membership";
const KEY_SNAPSHOT_META: &[u8] = b"meta";
/// Where snapshots were kept whole before they were files: read once at start and moved.
const KEY_SNAPSHOT_DATA: &[u8] = b"data";

fn sm_read_err(e: impl std::error::Error + Send + Sync + 'static) -> StorageError {
    StorageIOError::read_state_machine(&e).into()
}

fn sm_write_err(e: impl std::error::Error + Send + Sync + 'static) -> StorageError {
    StorageIOError::write_state_machine(&e).into()
}

fn snap_err(e: impl std::error::Error + Send + Sync + 'static) -> StorageError {
    StorageIOError::write_snapshot(None, &e).into()
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_else(|e| panic!("state-machine metadata serialises: {e}"))
}

/// Pending writes of one `apply` call over the database: reads see them first. It keeps
/// the due index ([`DueIndex`]) up to date run by run as it is written (apply has it to
/// itself), and remembers each run written as it was before the call and as it is now,
/// for the census.
struct Overlay<'a> {
    db: &'a Db,
    writes: BTreeMap<(Table, Vec<u8>), Option<Vec<u8>>>,
    due: &'a mut DueIndex,
    /// The tenant counts as of the last apply (read-only here: the API reads them while
    /// this apply runs) and what this apply's writes change in them so far.
    tenants: &'a Mutex<TenantCounts>,
    tenant_changes: TenantCounts,
    /// Run id → (the stored run before this call, the run as last written).
    runs: BTreeMap<Vec<u8>, (Option<RunView>, Option<RunView>)>,
    /// A read of a run's stored version failed while writing it: apply fails with it.
    failed: Option<KvError>,
}

impl Overlay<'_> {
    fn write_run(&mut self, key: &[u8], value: Option<&[u8]>) {
        let new = value.and_then(RunView::decode);
        let (before, latest) = match self.runs.remove(key) {
            Some(seen) => seen,
            None => match self.db.get(Table::Runs.name(), key) {
                Ok(stored) => {
                    let v = stored.and_then(|b| RunView::decode(&b));
                    (v.clone(), v)
                }
                Err(e) => {
                    self.failed = Some(KvError::from(e));
                    return;
                }
            },
        };
        self.due.run_change(latest.as_ref(), new.as_ref());
        self.tenant_changes
            .run_change(latest.as_ref(), new.as_ref());
        self.runs.insert(key.to_vec(), (before, new));
    }

    fn write_dag(&mut self, key: &[u8], value: Option<&[u8]>) {
        match self.get(Table::Dags, key) {
            Ok(old) => {
                let old = old.as_deref().and_then(DagView::decode);
                let new = value.and_then(DagView::decode);
                self.tenant_changes.dag_change(old.as_ref(), new.as_ref());
            }
            Err(e) => self.failed = Some(e),
        }
    }
}

impl Kv for Overlay<'_> {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        if let Some(v) = self.writes.get(&(table, key.to_vec())) {
            return Ok(v.clone());
        }
        Ok(self.db.get(table.name(), key)?)
    }
    fn put(&mut self, table: Table, key: Vec<u8>, value: Vec<u8>) {
        match table {
            Table::Runs => self.write_run(&key, Some(&value)),
            Table::Dags => self.write_dag(&key, Some(&value)),
            _ => {}
        }
        self.writes.insert((table, key), Some(value));
    }
    fn delete(&mut self, table: Table, key: Vec<u8>) {
        match table {
            Table::Runs => self.write_run(&key, None),
            Table::Dags => self.write_dag(&key, None),
            _ => {}
        }
        self.writes.insert((table, key), None);
    }
    fn keys_below(
        &self,
        table: Table,
        prefix: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, KvError> {
        if end <= prefix {
            return Ok(Vec::new());
        }
        debug_assert!(
            prefix.is_empty() || end.starts_with(prefix),
            "keys_below's end lies under its prefix (the pending writes are not filtered)"
        );
        let pending = self
            .writes
            .range((table, prefix.to_vec())..(table, end.to_vec()));
        // The first `limit` keys after the pending writes: read as many more stored keys
        // as this batch deleted in the range, so the answer never depends on how the
        // writes were split into batches (every replica applies the same keys).
        let deleted = pending.clone().filter(|(_, v)| v.is_none()).count();
        let mut merged: std::collections::BTreeSet<Vec<u8>> = self
            .db
            .keys_below(table, prefix, end, limit.saturating_add(deleted))?
            .into_iter()
            .collect();
        for ((_, k), v) in pending {
            match v {
                Some(_) => merged.insert(k.clone()),
                None => merged.remove(k),
            };
        }
        Ok(merged.into_iter().take(limit).collect())
    }
    fn supervision(&self, now: Millis) -> Result<Supervision, KvError> {
        if let Some(e) = &self.failed {
            return Err(KvError::Storage(e.to_string()));
        }
        Ok(self.due.supervision(now))
    }
    fn working_tenants(&self) -> Result<std::collections::BTreeSet<String>, KvError> {
        Ok(self.due.working_tenants())
    }
    fn attempts_by_tenant(&self) -> Result<std::collections::BTreeMap<String, u32>, KvError> {
        if let Some(e) = &self.failed {
            return Err(KvError::Storage(e.to_string()));
        }
        Ok(self.due.attempts_by_tenant())
    }
    fn queued_runs(
        &self,
        tenant: &str,
        dag_id: &str,
        limit: usize,
    ) -> Result<(crate::state::due::Load, Vec<String>), KvError> {
        if let Some(e) = &self.failed {
            return Err(KvError::Storage(e.to_string()));
        }
        Ok(self.due.queue(tenant, dag_id, limit))
    }
    fn waiting_runs(&self, limit: usize) -> Result<Vec<String>, KvError> {
        if let Some(e) = &self.failed {
            return Err(KvError::Storage(e.to_string()));
        }
        Ok(self.due.waiting(limit))
    }
    fn present_tenants(&self) -> Result<std::collections::BTreeSet<String>, KvError> {
        if let Some(e) = &self.failed {
            return Err(KvError::Storage(e.to_string()));
        }
        Ok(lock(self.tenants).present_tenants_with(&self.tenant_changes))
    }
    fn usage(&self, tenant: &str, dag_id: &str) -> Result<Usage, KvError> {
        if let Some(e) = &self.failed {
            return Err(KvError::Storage(e.to_string()));
        }
        Ok(lock(self.tenants).usage_with(&self.tenant_changes, tenant, dag_id))
    }
    fn scan_prefix(
        &self,
        table: Table,
        prefix: &[u8],
    ) -> Result<crate::state::machine::Entries, KvError> {
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = self
            .db
            .scan_prefix(table, prefix, None, usize::MAX)?
            .into_iter()
            .collect();
        let start = (table, prefix.to_vec());
        for ((t, k), v) in self.writes.range(start..) {
            if *t != table || !k.starts_with(prefix) {
                break;
            }
            match v {
                Some(v) => merged.insert(k.clone(), v.clone()),
                None => merged.remove(k),
            };
        }
        Ok(merged.into_iter().collect())
    }
}

/// The current snapshot: its metadata and the file that holds its data (absent in
/// what nodes stored before snapshots were files: the data was `KEY_SNAPSHOT_DATA`).
#[derive(Serialize, Deserialize)]
struct StoredSnapshotMeta {
    meta: SnapshotMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    file: Option<String>,
}

/// openraft's state machine handle. Cheap to clone: all state is in RocksDB.
#[derive(Clone)]
pub struct StateMachineStore {
    db: Db,
    snapshots: SnapshotFiles,
    snapshot_seq: Arc<AtomicU64>,
    applied_tx: Arc<watch::Sender<u64>>,
    census: Arc<Mutex<Counts>>,
    tenants: Arc<Mutex<TenantCounts>>,
    /// Only apply and a snapshot install use it (never at once: openraft calls the state
    /// machine one call at a time).
    due: Arc<Mutex<DueIndex>>,
    /// The DAGs each apply wrote, and a snapshot install, once the write is in the
    /// database (see [`Self::dags_since`]).
    dag_changes: Arc<Mutex<DagChanges>>,
}

/// What the state machine derives from all stored runs and DAGs and then keeps
/// incrementally.
struct Derived {
    counts: Counts,
    tenants: TenantCounts,
    due: DueIndex,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl StateMachineStore {
    /// Open over `db`; counts and indexes the stored runs once, and tidies the
    /// snapshot files (moving a snapshot kept the old way into one).
    pub fn new(db: Db) -> Result<Self, StorageError> {
        let (tx, _) = watch::channel(0);
        let all = Self::count_all(&db)?;
        let snapshots = SnapshotFiles::open(db.raw().path()).map_err(snap_err)?;
        let current = Self::current_snapshot_file(&db, &snapshots)?;
        snapshots.remove_all_but(current.as_deref());
        Ok(StateMachineStore {
            db,
            snapshots,
            snapshot_seq: Arc::new(AtomicU64::new(0)),
            applied_tx: Arc::new(tx),
            census: Arc::new(Mutex::new(all.counts)),
            tenants: Arc::new(Mutex::new(all.tenants)),
            due: Arc::new(Mutex::new(all.due)),
            dag_changes: Arc::new(Mutex::new(DagChanges::default())),
        })
    }

    /// Which stored DAGs changed after version `seen` of the change log (`None`: all
    /// of them). Read them after this returns; the scheduler reads only those.
    pub fn dags_since(&self, seen: Option<u64>) -> DagsSince {
        lock(&self.dag_changes).since(seen)
    }

    /// Running tasks per tenant as the due index keeps them (the fair share reads them
    /// from protocol 8).
    pub fn running_attempts(&self) -> std::collections::BTreeMap<String, u32> {
        lock(&self.due).attempts_by_tenant()
    }

    /// What the tenant quotas read (kept incrementally; a lookup, not a scan).
    pub fn tenant_counts(&self) -> std::sync::MutexGuard<'_, TenantCounts> {
        lock(&self.tenants)
    }

    /// Runs and tasks by state in the applied state (kept incrementally: O(1) to read).
    pub fn census(&self) -> Counts {
        lock(&self.census).clone()
    }

    /// Count and index every stored run and DAG (at start and after a snapshot install
    /// only).
    fn count_all(db: &Db) -> Result<Derived, StorageError> {
        let mut tenants = TenantCounts::default();
        let mut due = DueIndex::default();
        let entries = |table: Table| -> Result<crate::state::machine::Entries, StorageError> {
            let cf = db.cf(table.name()).map_err(sm_read_err)?;
            db.raw()
                .iterator_cf(cf, IteratorMode::Start)
                .map(|item| {
                    item.map(|(k, v)| (k.to_vec(), v.to_vec()))
                        .map_err(sm_read_err)
                })
                .collect()
        };
        // A run left out would never be supervised here while other replicas supervise
        // it: a run that does not decode stops the node, as it would stop apply.
        let mut views = Vec::new();
        for (k, v) in entries(Table::Runs)? {
            let view = RunView::decode(&v).ok_or_else(|| {
                sm_read_err(std::io::Error::other(format!(
                    "stored run {} does not decode",
                    String::from_utf8_lossy(&k)
                )))
            })?;
            tenants.run_change(None, Some(&view));
            due.run_change(None, Some(&view));
            views.push(view);
        }
        for (_, v) in entries(Table::Dags)? {
            if let Some(view) = DagView::decode(&v) {
                tenants.dag_change(None, Some(&view));
            }
        }
        Ok(Derived {
            counts: Counts::of(&views),
            tenants,
            due,
        })
    }

    fn set_derived(&self, all: Derived) {
        *lock(&self.census) = all.counts;
        *self.tenant_counts() = all.tenants;
        *lock(&self.due) = all.due;
    }

    /// Fires with the last applied index after every apply (for actors that react to
    /// state changes).
    pub fn subscribe_applied(&self) -> watch::Receiver<u64> {
        self.applied_tx.subscribe()
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&Db) -> Result<T, StorageError> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| sm_read_err(std::io::Error::other(e.to_string())))?
    }

    /// The last applied log id and membership stored in `db`.
    pub fn read_applied(db: &Db) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let last: Option<LogId> = db
            .get_json(CF_SM_META, KEY_LAST_APPLIED)
            .map_err(sm_read_err)?;
        let membership: Option<StoredMembership> = db
            .get_json(CF_SM_META, KEY_MEMBERSHIP)
            .map_err(sm_read_err)?;
        Ok((last, membership.unwrap_or_default()))
    }

    fn apply_entries(
        db: &Db,
        census: &Mutex<Counts>,
        tenants: &Mutex<TenantCounts>,
        due: &Mutex<DueIndex>,
        dag_changes: &Mutex<DagChanges>,
        entries: Vec<Entry>,
    ) -> Result<Vec<BatchResponse>, StorageError> {
        let mut due = lock(due);
        let mut overlay = Overlay {
            db,
            writes: BTreeMap::new(),
            due: &mut due,
            tenants,
            tenant_changes: TenantCounts::default(),
            runs: BTreeMap::new(),
            failed: None,
        };
        let mut responses = Vec::with_capacity(entries.len());
        let mut last: Option<LogId> = None;
        let mut membership: Option<StoredMembership> = None;
        let mut requests = 0usize;
        for entry in entries {
            last = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => responses.push(BatchResponse::default()),
                EntryPayload::Normal(batch) => {
                    let mut out = Vec::with_capacity(batch.requests.len());
                    requests += batch.requests.len();
                    for req in &batch.requests {
                        let r = apply_request(&mut overlay, req, entry.log_id.leader_id.term)
                            .map_err(|e| {
                                StorageError::from(StorageIOError::apply(entry.log_id, &e))
                            })?;
                        out.push(r);
                    }
                    responses.push(BatchResponse { responses: out });
                }
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m));
                    responses.push(BatchResponse::default());
                }
            }
        }
        // An error ends the node's RaftCore (openraft treats it as fatal), so the due index,
        // already ahead of the database, is never used again; a restart rebuilds it.
        if let Some(e) = overlay.failed.take() {
            return Err(sm_read_err(e));
        }
        // What this apply changes in the census: each run written, against its stored
        // version (the overlay's writes are not in the database yet).
        let run_changes: Vec<(Option<RunView>, Option<RunView>)> =
            std::mem::take(&mut overlay.runs).into_values().collect();
        let changes: Vec<Change> = run_changes
            .iter()
            .map(|(old, new)| Change::between(old.as_ref(), new.as_ref()))
            .collect();
        let mut batch = WriteBatch::default();
        let dags_written: Vec<Vec<u8>> = overlay
            .writes
            .keys()
            .filter(|(t, _)| *t == Table::Dags)
            .map(|(_, k)| k.clone())
            .collect();
        for ((table, key), value) in overlay.writes {
            let cf = db.cf(table.name()).map_err(sm_write_err)?;
            match value {
                Some(v) => batch.put_cf(cf, key, v),
                None => batch.delete_cf(cf, key),
            }
        }
        let meta = db.cf(CF_SM_META).map_err(sm_write_err)?;
        if let Some(last) = last {
            batch.put_cf(meta, KEY_LAST_APPLIED, to_json(&last));
        }
        if let Some(m) = membership {
            batch.put_cf(meta, KEY_MEMBERSHIP, to_json(&m));
        }
        // Not synced: if lost in a crash, last_applied is lost with it and openraft
        // re-applies from the (synced) log. Snapshots sync the WAL before they are taken.
        db.write(batch, false).map_err(sm_write_err)?;
        lock(dag_changes).record(dags_written);
        if requests > 0 {
            metrics::histogram!(m::RAFT_APPLY_BATCH).record(requests as f64);
        }
        lock(tenants).merge(&overlay.tenant_changes);
        let mut counts = census.lock().unwrap_or_else(|p| p.into_inner());
        for c in &changes {
            counts.add(c);
            if c.retries > 0 {
                metrics::counter!(m::TASK_RETRIES).increment(c.retries);
            }
            if let Some((state, ms)) = c.finished {
                metrics::histogram!(m::RUN_SECONDS, "state" => census::run_state_name(state))
                    .record(ms as f64 / 1000.0);
            }
        }
        Ok(responses)
    }

    /// The file of the current snapshot, if there is one. A snapshot stored whole in
    /// RocksDB (before snapshots were files) becomes a file here, once. Metadata that
    /// names no readable snapshot (a lost file, an empty legacy value) is dropped with a
    /// warning: openraft then builds a new snapshot from the state, where it needs one,
    /// instead of the node failing every start on it.
    fn current_snapshot_file(
        db: &Db,
        files: &SnapshotFiles,
    ) -> Result<Option<String>, StorageError> {
        let stored: Option<StoredSnapshotMeta> = db
            .get_json(CF_SNAPSHOT, KEY_SNAPSHOT_META)
            .map_err(snap_err)?;
        let Some(mut stored) = stored else {
            return Ok(None);
        };
        let cf = db.cf(CF_SNAPSHOT).map_err(snap_err)?;
        let mut batch = WriteBatch::default();
        let readable = |f: std::fs::File| SnapshotReader::new(f).is_ok();
        match &stored.file {
            Some(name) => {
                if std::fs::File::open(files.path(name)).is_ok_and(readable) {
                    return Ok(stored.file);
                }
                tracing::warn!(file = %files.path(name).display(),
                               "the current snapshot's file is missing or damaged: forgetting it");
            }
            None => {
                let data = db
                    .get(CF_SNAPSHOT, KEY_SNAPSHOT_DATA)
                    .map_err(snap_err)?
                    .unwrap_or_default();
                if SnapshotReader::new(data.as_slice()).is_ok() {
                    let name = SnapshotFiles::new_name(stored.meta.last_log_id.map(|l| l.index));
                    files.write_from(&name, data.as_slice()).map_err(snap_err)?;
                    stored.file = Some(name);
                    batch.put_cf(cf, KEY_SNAPSHOT_META, to_json(&stored));
                    batch.delete_cf(cf, KEY_SNAPSHOT_DATA);
                    db.write(batch, true).map_err(snap_err)?;
                    return Ok(stored.file);
                }
                tracing::warn!("the stored snapshot is empty or damaged: forgetting it");
            }
        }
        batch.delete_cf(cf, KEY_SNAPSHOT_META);
        batch.delete_cf(cf, KEY_SNAPSHOT_DATA);
        db.write(batch, true).map_err(snap_err)?;
        Ok(None)
    }

    /// Stream every replicated table from one point-in-time view into a new snapshot
    /// file; its metadata, name and open handle.
    fn write_snapshot_file(
        db: &Db,
        files: &SnapshotFiles,
        seq: u64,
    ) -> Result<(SnapshotMeta, String, std::fs::File), StorageError> {
        // Everything this snapshot covers must survive a crash: the log behind it may be
        // purged as soon as it exists.
        db.raw().flush_wal(true).map_err(snap_err)?;
        let snap = db.raw().snapshot();
        let meta_cf = db.cf(CF_SM_META).map_err(snap_err)?;
        let read_meta = |key: &[u8]| -> Result<Option<Vec<u8>>, StorageError> {
            snap.get_cf(meta_cf, key).map_err(snap_err)
        };
        let last: Option<LogId> = match read_meta(KEY_LAST_APPLIED)? {
            Some(b) => serde_json::from_slice(&b).map_err(snap_err)?,
            None => None,
        };
        let membership: StoredMembership = match read_meta(KEY_MEMBERSHIP)? {
            Some(b) => serde_json::from_slice(&b).map_err(snap_err)?,
            None => StoredMembership::default(),
        };
        let name = SnapshotFiles::new_name(last.map(|l| l.index));
        let file = files
            .write(&name, |w| {
                for table in Table::ALL {
                    let cf = db.cf(table.name()).map_err(std::io::Error::other)?;
                    for item in snap.iterator_cf(cf, IteratorMode::Start) {
                        let (k, v) = item.map_err(std::io::Error::other)?;
                        w.record(table, &k, &v)?;
                    }
                }
                Ok(())
            })
            .map_err(snap_err)?;
        let snapshot_id = match last {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, seq),
            None => format!("none-{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: membership,
            snapshot_id,
        };
        Ok((meta, name, file))
    }

    /// Make snapshot file `name` the current snapshot (its file is durable already),
    /// in `batch`.
    fn store_snapshot(
        db: &Db,
        meta: &SnapshotMeta,
        name: &str,
        batch: &mut WriteBatch,
    ) -> Result<(), StorageError> {
        let cf = db.cf(CF_SNAPSHOT).map_err(snap_err)?;
        let stored = StoredSnapshotMeta {
            meta: meta.clone(),
            file: Some(name.to_string()),
        };
        batch.put_cf(cf, KEY_SNAPSHOT_META, to_json(&stored));
        batch.delete_cf(cf, KEY_SNAPSHOT_DATA);
        Ok(())
    }

    /// A snapshot file for openraft (which reads it to send it).
    fn snapshot_data(file: std::fs::File) -> SnapshotData {
        Box::new(tokio::fs::File::from_std(file))
    }
}

type SnapshotData = Box<tokio::fs::File>;

pub use super::snapshot_store::parse_snapshot;

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        self.blocking(Self::read_applied).await
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<BatchResponse>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let last = entries.last().map(|e| e.log_id.index);
        let (census, tenants, due) = (self.census.clone(), self.tenants.clone(), self.due.clone());
        let dag_changes = self.dag_changes.clone();
        let out = self
            .blocking(move |db| {
                Self::apply_entries(db, &census, &tenants, &due, &dag_changes, entries)
            })
            .await?;
        if let Some(idx) = last {
            self.applied_tx.send_replace(idx);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<SnapshotData, StorageError> {
        let file = self.snapshots.receiving().map_err(snap_err)?;
        Ok(Box::new(tokio::fs::File::from_std(file)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> Result<(), StorageError> {
        let meta = meta.clone();
        let mut received = snapshot.into_std().await;
        let idx = meta.last_log_id.map(|l| l.index);
        let files = self.snapshots.clone();
        self.blocking(move |db| {
            let bad = |e: String| {
                StorageError::from(StorageIOError::read_snapshot(
                    Some(meta.signature()),
                    &std::io::Error::other(e),
                ))
            };
            // Kept as the current snapshot (for followers that need it next), then read
            // from there, record by record.
            use std::io::Seek;
            received.rewind().map_err(snap_err)?;
            let name = SnapshotFiles::new_name(idx);
            let file = files.write_from(&name, &mut received).map_err(snap_err)?;
            let mut batch = WriteBatch::default();
            // Replace the whole state machine: delete what the snapshot lacks.
            for table in Table::ALL {
                let cf = db.cf(table.name()).map_err(snap_err)?;
                for item in db.raw().iterator_cf(cf, IteratorMode::Start) {
                    let (k, _) = item.map_err(snap_err)?;
                    batch.delete_cf(cf, k);
                }
            }
            for record in SnapshotReader::new(file).map_err(bad)? {
                let (table, k, v) = record.map_err(bad)?;
                batch.put_cf(db.cf(table.name()).map_err(snap_err)?, k, v);
            }
            let meta_cf = db.cf(CF_SM_META).map_err(snap_err)?;
            batch.put_cf(meta_cf, KEY_LAST_APPLIED, to_json(&meta.last_log_id));
            batch.put_cf(meta_cf, KEY_MEMBERSHIP, to_json(&meta.last_membership));
            Self::store_snapshot(db, &meta, &name, &mut batch)?;
            let _commit = files.commit_lock();
            db.write(batch, true).map_err(snap_err)?;
            files.remove_older_than(&name);
            Self::count_all(db)
        })
        .await
        .map(|all| self.set_derived(all))?;
        lock(&self.dag_changes).all_changed();
        metrics::counter!(m::RAFT_SNAPSHOTS, "kind" => "installed").increment(1);
        if let Some(idx) = idx {
            self.applied_tx.send_replace(idx);
        }
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let files = self.snapshots.clone();
        self.blocking(move |db| {
            // No commit may remove the file between reading its name and opening it.
            let _commit = files.commit_lock();
            let stored: Option<StoredSnapshotMeta> = db
                .get_json(CF_SNAPSHOT, KEY_SNAPSHOT_META)
                .map_err(snap_err)?;
            let Some(StoredSnapshotMeta {
                meta,
                file: Some(name),
            }) = stored
            else {
                return Ok(None);
            };
            let file = std::fs::File::open(files.path(&name)).map_err(snap_err)?;
            Ok(Some(Snapshot {
                meta,
                snapshot: Self::snapshot_data(file),
            }))
        })
        .await
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let seq = self.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let files = self.snapshots.clone();
        self.blocking(move |db| {
            let (meta, name, file) = Self::write_snapshot_file(db, &files, seq)?;
            let _commit = files.commit_lock();
            // A snapshot installed while this one was built is newer: it stays current.
            let current: Option<StoredSnapshotMeta> = db
                .get_json(CF_SNAPSHOT, KEY_SNAPSHOT_META)
                .map_err(snap_err)?;
            // (openraft still gets this one, through the open handle; its file sorts
            // before the newer one's and goes with the next commit or start).
            if current.is_none_or(|c| c.meta.last_log_id <= meta.last_log_id) {
                let mut batch = WriteBatch::default();
                Self::store_snapshot(db, &meta, &name, &mut batch)?;
                db.write(batch, true).map_err(snap_err)?;
                files.remove_older_than(&name);
            }
            metrics::counter!(m::RAFT_SNAPSHOTS, "kind" => "built").increment(1);
            Ok(Snapshot {
                meta,
                snapshot: Self::snapshot_data(file),
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The overlay's first `limit` keys are those of the stored keys with this batch's
    /// writes applied, however many of the first stored keys the batch deleted: every
    /// replica purges the same chunk whatever its batches were.
    #[test]
    fn keys_below_stops_at_its_limit_after_the_pending_writes() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let db = Db::open(dir.path()).expect("open");
        let cf = db.cf(Table::Requests.name()).expect("the requests table");
        let mut batch = WriteBatch::default();
        for k in ["a", "b", "c", "d", "e", "f"] {
            batch.put_cf(cf, k, b"");
        }
        db.write(batch, false).expect("write");
        let (mut due, tenants) = (DueIndex::default(), Mutex::new(TenantCounts::default()));
        let mut overlay = Overlay {
            db: &db,
            writes: BTreeMap::new(),
            due: &mut due,
            tenants: &tenants,
            tenant_changes: TenantCounts::default(),
            runs: BTreeMap::new(),
            failed: None,
        };
        let keys = |o: &Overlay, limit| -> Vec<String> {
            o.keys_below(Table::Requests, b"", b"z", limit)
                .expect("keys")
                .into_iter()
                .map(|k| String::from_utf8_lossy(&k).into_owned())
                .collect()
        };
        assert_eq!(keys(&overlay, 2), ["a", "b"]);
        overlay.delete(Table::Requests, b"a".to_vec());
        overlay.delete(Table::Requests, b"b".to_vec());
        overlay.delete(Table::Requests, b"d".to_vec());
        overlay.put(Table::Requests, b"bb".to_vec(), Vec::new());
        assert_eq!(keys(&overlay, 3), ["bb", "c", "e"]);
        assert_eq!(keys(&overlay, 1), ["bb"]);
        assert_eq!(keys(&overlay, usize::MAX), ["bb", "c", "e", "f"]);
        // Below `end` only.
        let below_d: Vec<Vec<u8>> = overlay
            .keys_below(Table::Requests, b"", b"d", 10)
            .expect("keys");
        assert_eq!(below_d, [b"bb".to_vec(), b"c".to_vec()]);
    }
}

//! The replicated tables apply works on: their names, their keys, the stored records of
//! answered requests, and [`Kv`], the only view of them apply has (a RocksDB write batch
//! in production, a map in tests); with the JSON and counter helpers over it.

use super::*;

/// The replicated tables (one RocksDB column family each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    /// `tenant \0 dag_id` → [`Dag`]
    Dags,
    /// `tenant \0 dag_id \0 version(be u64)` → [`DagSpec`], or from protocol 11 for a
    /// version with a shell task a [`StoredVersion`] (the spec and its shell grant)
    DagVersions,
    /// `run_id` → [`Run`]
    Runs,
    /// `tenant \0 dag_id \0 created \0 run_id` → empty (a DAG's runs in creation order)
    RunsByDag,
    /// `tenant \0 created \0 run_id` → empty (a tenant's runs in creation order)
    RunsByTenant,
    /// `tenant \0 dag_id \0 start \0 end` → run_id (one run per window)
    Windows,
    /// `tenant \0 dag_id \0 run_id` → [`ActiveEntry`] (runs not finished)
    ActiveRuns,
    /// `ended \0 run_id` → empty (finished runs by end time, for retention)
    FinishedRuns,
    /// `node(be u64) \0 run_id \0 task_id` → attempt (be u32): what each node must run
    Assignments,
    /// `node(be u64)` → [`NodeInfo`]
    Nodes,
    /// `tenant \0 dag_id` → last fired window end (be i64, ordered)
    Cursors,
    /// `run_id \0 event` → [`Notification`]
    Notifications,
    /// `tenant \0 key` → [`IdempotencyRecord`]; from protocol 10 also, by creation
    /// time for the purge, `\0 created(ordered i64) tenant \0 key` → empty
    /// ([`keys::record_by_time`]; a tenant never starts with NUL)
    Idempotency,
    /// `request_id` → [`RequestRecord`] (a retried write is answered, not re-applied);
    /// from protocol 10 also `\0 created(ordered i64) request_id` → empty (request ids
    /// are hex)
    Requests,
    /// counter name → be u64
    Counters,
}

impl Table {
    pub const ALL: [Table; 15] = [
        Table::Dags,
        Table::DagVersions,
        Table::Runs,
        Table::RunsByDag,
        Table::RunsByTenant,
        Table::Windows,
        Table::ActiveRuns,
        Table::FinishedRuns,
        Table::Assignments,
        Table::Nodes,
        Table::Cursors,
        Table::Notifications,
        Table::Idempotency,
        Table::Requests,
        Table::Counters,
    ];

    /// The column family name.
    pub fn name(self) -> &'static str {
        match self {
            Table::Dags => "dags",
            Table::DagVersions => "dag_versions",
            Table::Runs => "runs",
            Table::RunsByDag => "runs_by_dag",
            Table::RunsByTenant => "runs_by_tenant",
            Table::Windows => "windows",
            Table::ActiveRuns => "active_runs",
            Table::FinishedRuns => "finished_runs",
            Table::Assignments => "assignments",
            Table::Nodes => "nodes",
            Table::Cursors => "cursors",
            Table::Notifications => "notifications",
            Table::Idempotency => "idempotency",
            Table::Requests => "requests",
            Table::Counters => "counters",
        }
    }

    pub fn index(self) -> u8 {
        Table::ALL
            .iter()
            .position(|t| *t == self)
            .expect("every table is listed in Table::ALL") as u8
    }

    pub fn from_index(i: u8) -> Option<Table> {
        Table::ALL.get(i as usize).copied()
    }
}

/// Failure to read or decode replicated state: fatal for the node (openraft stops).
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("storage: {0}")]
    Storage(String),
    #[error("corrupt value in table {table:?}: {source}")]
    Corrupt {
        table: Table,
        #[source]
        source: serde_json::Error,
    },
}

/// Key/value pairs, in key order.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// Key/value access to the replicated tables, with read-your-writes inside one apply.
pub trait Kv {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, KvError>;
    fn put(&mut self, table: Table, key: Vec<u8>, value: Vec<u8>);
    fn delete(&mut self, table: Table, key: Vec<u8>);
    /// Every entry whose key starts with `prefix`, in key order, pending writes included.
    fn scan_prefix(&self, table: Table, prefix: &[u8]) -> Result<Entries, KvError>;
    /// The first `limit` keys under `prefix` that sort below `end`, in key order,
    /// pending writes included. This default reads the whole prefix; the state machine's
    /// store reads only what it returns (and as many keys as the batch deleted there).
    fn keys_below(
        &self,
        table: Table,
        prefix: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, KvError> {
        Ok(self
            .scan_prefix(table, prefix)?
            .into_iter()
            .map(|(k, _)| k)
            .take_while(|k| k.as_slice() < end)
            .take(limit)
            .collect())
    }
    /// What a supervise pass at `now` must look at ([`crate::state::due`]), pending writes
    /// included. This default reads every active run; the state machine's store keeps the
    /// index as it writes and answers from it.
    fn supervision(&self, now: Millis) -> Result<Supervision, KvError> {
        let mut index = DueIndex::default();
        for (k, _) in self.scan_prefix(Table::ActiveRuns, b"")? {
            if let Some(bytes) = self.get(Table::Runs, keys::last_part(&k))? {
                index.run_change(None, RunView::decode(&bytes).as_ref());
            }
        }
        Ok(index.supervision(now))
    }
    /// A DAG's queued and running runs, and its first `limit` queued runs in the order
    /// they start (oldest window, then oldest creation, then run id), pending writes
    /// included. This default reads the DAG's active runs; the state machine's store
    /// answers from its due index.
    fn queued_runs(
        &self,
        tenant: &str,
        dag_id: &str,
        limit: usize,
    ) -> Result<(Load, Vec<String>), KvError> {
        let entries = self.scan_prefix(
            Table::ActiveRuns,
            &keys::prefix(&[tenant.as_bytes(), dag_id.as_bytes()]),
        )?;
        let mut load = Load::default();
        let mut queued: Vec<(Millis, Millis, String)> = Vec::new();
        for (k, v) in entries {
            let e: ActiveEntry = decode(Table::ActiveRuns, &v)?;
            let run_id = String::from_utf8_lossy(keys::last_part(&k)).into_owned();
            match e.state {
                RunState::Running => load.running += 1,
                RunState::Queued => {
                    load.queued += 1;
                    queued.push((e.window_start_ms, e.created_ms, run_id));
                }
                _ => {}
            }
        }
        queued.sort();
        let next = queued
            .into_iter()
            .take(limit)
            .map(|(_, _, id)| id)
            .collect();
        Ok((load, next))
    }
    /// Up to `limit` runs with ready tasks waiting for a slot (or nothing in flight), in
    /// the supervise pass's order, pending writes included. This default reads every
    /// active run; the state machine's store answers from its due index.
    fn waiting_runs(&self, limit: usize) -> Result<Vec<String>, KvError> {
        let mut runs = self.supervision(Millis::MIN)?.runs;
        runs.truncate(limit);
        Ok(runs)
    }
    /// What `tenant` holds against its quotas (and `dag_id`'s queued runs), pending
    /// writes included. This default reads the tenant's DAGs and unfinished runs; the
    /// state machine's store answers from counts it keeps as it writes.
    fn usage(&self, tenant: &str, dag_id: &str) -> Result<Usage, KvError> {
        let counts = scanned_tenant_counts(self, &keys::prefix(&[tenant.as_bytes()]))?;
        Ok(counts.usage(tenant, dag_id))
    }
    /// Running attempts per tenant, pending writes included (for the fair share of slots,
    /// protocol ≥ 8). This default reads every run; the state machine's store answers
    /// from its due index.
    fn attempts_by_tenant(&self) -> Result<std::collections::BTreeMap<String, u32>, KvError> {
        let mut index = DueIndex::default();
        for (_, v) in self.scan_prefix(Table::Runs, b"")? {
            index.run_change(None, RunView::decode(&v).as_ref());
        }
        Ok(index.attempts_by_tenant())
    }
    /// Tenants with live DAGs or unfinished runs, pending writes included (for the cap
    /// on a tenant's share of the slots). This default reads every DAG and active run;
    /// the state machine's store answers from the counts it keeps as it writes.
    fn present_tenants(&self) -> Result<std::collections::BTreeSet<String>, KvError> {
        let counts = scanned_tenant_counts(self, b"")?;
        Ok(counts.present_tenants_with(&TenantCounts::default()))
    }
    /// Tenants with running runs (for the fair share of slots). This default reads every
    /// active run's entry; the state machine's store answers from its due index.
    fn working_tenants(&self) -> Result<std::collections::BTreeSet<String>, KvError> {
        let mut working = std::collections::BTreeSet::new();
        for (k, v) in self.scan_prefix(Table::ActiveRuns, b"")? {
            let e: ActiveEntry = decode(Table::ActiveRuns, &v)?;
            if e.state == RunState::Running {
                let tenant = k.split(|b| *b == 0).next().unwrap_or_default();
                working.insert(String::from_utf8_lossy(tenant).into_owned());
            }
        }
        Ok(working)
    }
}

/// The tenant counts of the DAGs and unfinished runs whose keys start with `prefix`
/// (a tenant's, or every one), counted by a scan: what the store keeps incrementally.
fn scanned_tenant_counts<K: Kv + ?Sized>(kv: &K, prefix: &[u8]) -> Result<TenantCounts, KvError> {
    let mut counts = TenantCounts::default();
    for (_, v) in kv.scan_prefix(Table::Dags, prefix)? {
        counts.dag_change(None, DagView::decode(&v).as_ref());
    }
    for (k, _) in kv.scan_prefix(Table::ActiveRuns, prefix)? {
        if let Some(bytes) = kv.get(Table::Runs, keys::last_part(&k))? {
            counts.run_change(None, RunView::decode(&bytes).as_ref());
        }
    }
    Ok(counts)
}

/// A stored answer to an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct IdempotencyRecord {
    pub fingerprint: String,
    pub outcome: Outcome,
    pub created_ms: Millis,
}

/// A stored answer to a request id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RequestRecord {
    pub outcome: Outcome,
    pub created_ms: Millis,
}

/// Key builders, shared with the read side.
pub mod keys {
    use super::Window;
    use crate::raft::NodeId;

    pub fn join(parts: &[&[u8]]) -> Vec<u8> {
        let mut k = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                k.push(0);
            }
            k.extend_from_slice(p);
        }
        k
    }

    /// A record's entry in its table's time index (protocol 10): NUL, then its creation
    /// time, then the record's own key. Record keys never start with NUL, so the index
    /// sorts before every record and in time order.
    pub fn record_by_time(created_ms: i64, record_key: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(9 + record_key.len());
        k.push(0);
        k.extend_from_slice(&ordered_i64(created_ms));
        k.extend_from_slice(record_key);
        k
    }

    /// The time and record key of a time-index entry ([`record_by_time`]).
    pub fn record_of_time_entry(entry: &[u8]) -> Option<(i64, &[u8])> {
        if entry.first() != Some(&0) {
            return None;
        }
        Some((from_ordered_i64(entry.get(1..9)?)?, entry.get(9..)?))
    }

    /// `parts` joined, with a trailing separator: the prefix of everything below them.
    pub fn prefix(parts: &[&[u8]]) -> Vec<u8> {
        let mut k = join(parts);
        k.push(0);
        k
    }

    pub fn dag(tenant: &str, dag_id: &str) -> Vec<u8> {
        join(&[tenant.as_bytes(), dag_id.as_bytes()])
    }

    pub fn dag_version(tenant: &str, dag_id: &str, version: u64) -> Vec<u8> {
        join(&[tenant.as_bytes(), dag_id.as_bytes(), &version.to_be_bytes()])
    }

    pub fn window(tenant: &str, dag_id: &str, w: &Window) -> Vec<u8> {
        join(&[
            tenant.as_bytes(),
            dag_id.as_bytes(),
            &ordered_i64(w.start_ms),
            &ordered_i64(w.end_ms),
        ])
    }

    pub fn run_by_dag(tenant: &str, dag_id: &str, created_ms: i64, run_id: &str) -> Vec<u8> {
        join(&[
            tenant.as_bytes(),
            dag_id.as_bytes(),
            &ordered_i64(created_ms),
            run_id.as_bytes(),
        ])
    }

    pub fn run_by_tenant(tenant: &str, created_ms: i64, run_id: &str) -> Vec<u8> {
        join(&[
            tenant.as_bytes(),
            &ordered_i64(created_ms),
            run_id.as_bytes(),
        ])
    }

    pub fn active(tenant: &str, dag_id: &str, run_id: &str) -> Vec<u8> {
        join(&[tenant.as_bytes(), dag_id.as_bytes(), run_id.as_bytes()])
    }

    pub fn finished(ended_ms: i64, run_id: &str) -> Vec<u8> {
        join(&[&ordered_i64(ended_ms), run_id.as_bytes()])
    }

    pub fn assignment(node: NodeId, run_id: &str, task_id: &str) -> Vec<u8> {
        join(&[&node.to_be_bytes(), run_id.as_bytes(), task_id.as_bytes()])
    }

    pub fn node(node: NodeId) -> Vec<u8> {
        node.to_be_bytes().to_vec()
    }

    pub fn notification(run_id: &str, event: &str) -> Vec<u8> {
        join(&[run_id.as_bytes(), event.as_bytes()])
    }

    pub fn idempotency(tenant: &str, key: &str) -> Vec<u8> {
        join(&[tenant.as_bytes(), key.as_bytes()])
    }

    /// Big-endian with the sign bit flipped, so byte order is numeric order.
    pub fn ordered_i64(v: i64) -> [u8; 8] {
        ((v as u64) ^ (1 << 63)).to_be_bytes()
    }

    pub fn from_ordered_i64(b: &[u8]) -> Option<i64> {
        let arr: [u8; 8] = b.try_into().ok()?;
        Some((u64::from_be_bytes(arr) ^ (1 << 63)) as i64)
    }

    /// Split a key at its separators (ids never contain NUL; fixed-width parts might, so
    /// callers only split keys whose fixed-width parts come last or are handled apart).
    pub fn last_part(key: &[u8]) -> &[u8] {
        match key.iter().rposition(|b| *b == 0) {
            Some(i) => &key[i + 1..],
            None => key,
        }
    }
}

pub(super) const RUN_SEQ: &[u8] = b"run_seq";

pub(super) fn get_json<T: DeserializeOwned>(
    kv: &impl Kv,
    table: Table,
    key: &[u8],
) -> Result<Option<T>, KvError> {
    match kv.get(table, key)? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| KvError::Corrupt { table, source }),
    }
}

pub(super) fn decode<T: DeserializeOwned>(table: Table, bytes: &[u8]) -> Result<T, KvError> {
    serde_json::from_slice(bytes).map_err(|source| KvError::Corrupt { table, source })
}

pub(super) fn put_json<T: Serialize>(kv: &mut impl Kv, table: Table, key: Vec<u8>, value: &T) {
    let bytes = serde_json::to_vec(value)
        .unwrap_or_else(|e| panic!("state values always serialise to JSON: {e}"));
    kv.put(table, key, bytes);
}

pub(super) fn next_counter(kv: &mut impl Kv, name: &[u8]) -> Result<u64, KvError> {
    let current = match kv.get(Table::Counters, name)? {
        None => 0,
        Some(b) => {
            let arr: [u8; 8] = b.as_slice().try_into().map_err(|_| {
                KvError::Storage(format!(
                    "counter {} has {} bytes, expected 8",
                    String::from_utf8_lossy(name),
                    b.len()
                ))
            })?;
            u64::from_be_bytes(arr)
        }
    };
    let next = current + 1;
    kv.put(Table::Counters, name.to_vec(), next.to_be_bytes().to_vec());
    Ok(next)
}

pub(super) fn read_u64(kv: &impl Kv, name: &[u8]) -> Result<Option<u64>, KvError> {
    kv.get(Table::Counters, name)?
        .map(|b| {
            <[u8; 8]>::try_from(b.as_slice())
                .map(u64::from_be_bytes)
                .map_err(|_| {
                    KvError::Storage(format!(
                        "counter {} holds {} bytes, expected 8",
                        String::from_utf8_lossy(name),
                        b.len()
                    ))
                })
        })
        .transpose()
}

pub(super) fn read_i64(kv: &impl Kv, name: &[u8]) -> Result<Option<i64>, KvError> {
    Ok(kv
        .get(Table::Counters, name)?
        .and_then(|b| keys::from_ordered_i64(&b)))
}

/// Replicated clock records, kept in the counters table.
pub mod clock {
    /// The protocol version (be u64).
    pub const PROTOCOL: &[u8] = b"protocol";
    /// The cluster clock: the largest stamp applied so far (ordered i64 ms).
    pub const CLUSTER_TIME: &[u8] = b"cluster_time_ms";
    /// The term of the last applied request (be u64).
    pub const TERM: &[u8] = b"clock_term";
    /// Cluster time when that term's first request was applied (ordered i64 ms).
    pub const TERM_STARTED: &[u8] = b"clock_term_started_ms";
    /// Cluster time of the raise to protocol 10 (ordered i64 ms): records created before
    /// it have no time-index entry. Dropped once a purge has removed them all.
    pub const RECORDS_INDEXED_FROM: &[u8] = b"records_indexed_from_ms";
}

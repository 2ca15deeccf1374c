//! The node's RocksDB: one database with a column family for the Raft log, one for Raft
//! metadata (vote, committed, purged), one for state-machine metadata (last applied,
//! membership), one for the current snapshot and one per replicated [`Table`].
//! One database means one WAL: a synced log append also makes every earlier
//! state-machine write durable.

use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch, DB};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::state::{KvError, Table};

pub const CF_LOG: &str = "raft_log";
pub const CF_RAFT_META: &str = "raft_meta";
pub const CF_SM_META: &str = "sm_meta";
pub const CF_SNAPSHOT: &str = "snapshot";
const KEY_DISK_ID: &[u8] = b"disk_id";

/// Errors opening or reading the node's database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(transparent)]
    Rocks(#[from] rocksdb::Error),
    #[error("column family {0} is missing")]
    MissingColumnFamily(String),
    #[error("corrupt value in {cf}")]
    Corrupt {
        cf: String,
        #[source]
        source: serde_json::Error,
    },
}

impl From<DbError> for KvError {
    fn from(e: DbError) -> Self {
        KvError::Storage(e.to_string())
    }
}

/// What all memtables together hold before RocksDB flushes them.
const MEMTABLE_BUDGET: usize = 64 << 20;
/// The block cache every table reads through.
const BLOCK_CACHE: usize = 32 << 20;

/// A shared handle to the node's database.
#[derive(Clone)]
pub struct Db {
    inner: Arc<DB>,
}

impl Db {
    /// Open (creating if needed) the database under `dir`.
    pub fn open(dir: &Path) -> Result<Db, DbError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_keep_log_file_num(4);
        opts.set_max_total_wal_size(64 << 20);
        // One memory budget for the whole database. By default each of the ~20 column
        // families may hold two 64 MiB memtables and reads its own block cache, so the
        // memory a node uses grew with the tables written, not with a bound (a leader
        // reached 717 MB under the `firelag` benchmark). Memtables now flush once they hold
        // `MEMTABLE_BUDGET` together, and every table reads through one block cache.
        opts.set_db_write_buffer_size(MEMTABLE_BUDGET);
        let cache = rocksdb::Cache::new_lru_cache(BLOCK_CACHE);
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_block_cache(&cache);
        let mut cf_opts = Options::default();
        cf_opts.set_block_based_table_factory(&table);
        cf_opts.set_write_buffer_size(MEMTABLE_BUDGET / 4);
        let mut names = vec![CF_LOG, CF_RAFT_META, CF_SM_META, CF_SNAPSHOT];
        names.extend(Table::ALL.iter().map(|t| t.name()));
        let cfs = names
            .iter()
            .map(|n| ColumnFamilyDescriptor::new(*n, cf_opts.clone()));
        let db = DB::open_cf_descriptors(&opts, dir, cfs)?;
        Ok(Db {
            inner: Arc::new(db),
        })
    }

    pub fn raw(&self) -> &DB {
        &self.inner
    }

    pub fn cf(&self, name: &str) -> Result<&ColumnFamily, DbError> {
        self.inner
            .cf_handle(name)
            .ok_or_else(|| DbError::MissingColumnFamily(name.to_string()))
    }

    pub fn get(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        Ok(self.inner.get_cf(self.cf(cf)?, key)?)
    }

    pub fn get_json<T: DeserializeOwned>(
        &self,
        cf: &str,
        key: &[u8],
    ) -> Result<Option<T>, DbError> {
        match self.get(cf, key)? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|source| DbError::Corrupt {
                    cf: cf.to_string(),
                    source,
                }),
        }
    }

    /// Up to `limit` entries of `table` whose key starts with `prefix`, from `after`
    /// (exclusive) on.
    pub fn scan_prefix(
        &self,
        table: Table,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<crate::state::machine::Entries, DbError> {
        let cf = self.cf(table.name())?;
        let start = after.unwrap_or(prefix);
        let mut out = Vec::new();
        let iter = self
            .inner
            .iterator_cf(cf, IteratorMode::From(start, rocksdb::Direction::Forward));
        for item in iter {
            let (k, v) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            if after.is_some_and(|a| &*k == a) {
                continue;
            }
            out.push((k.to_vec(), v.to_vec()));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// The keys of `table` under `prefix` that sort below `end`, in key order: a range
    /// read that stops at `end` and copies no value.
    pub fn keys_below(
        &self,
        table: Table,
        prefix: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, DbError> {
        let cf = self.cf(table.name())?;
        let mut out = Vec::new();
        // A raw iterator: keys are read without copying their values.
        let mut it = self.inner.raw_iterator_cf(cf);
        it.seek(prefix);
        while let Some(k) = it.key() {
            if !k.starts_with(prefix) || k >= end || out.len() >= limit {
                break;
            }
            out.push(k.to_vec());
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// Up to `limit` entries of `table` under `prefix` in descending key order, from
    /// `before` (exclusive) down.
    pub fn scan_prefix_rev(
        &self,
        table: Table,
        prefix: &[u8],
        before: Option<&[u8]>,
        limit: usize,
    ) -> Result<crate::state::machine::Entries, DbError> {
        let cf = self.cf(table.name())?;
        // Every key under the prefix sorts below the prefix with its last byte bumped.
        let mut upper = prefix.to_vec();
        while let Some(last) = upper.pop() {
            if last < 0xFF {
                upper.push(last + 1);
                break;
            }
        }
        let start = before.map(<[u8]>::to_vec).unwrap_or(upper);
        let mut out = Vec::new();
        let iter = if start.is_empty() {
            self.inner.iterator_cf(cf, IteratorMode::End)
        } else {
            self.inner
                .iterator_cf(cf, IteratorMode::From(&start, rocksdb::Direction::Reverse))
        };
        for item in iter {
            let (k, v) = item?;
            if *k >= *start.as_slice() && !start.is_empty() {
                continue;
            }
            if !k.starts_with(prefix) {
                if *k < *prefix {
                    break;
                }
                continue;
            }
            out.push((k.to_vec(), v.to_vec()));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// This disk's identity: made once, at random, when the node's state is first
    /// created here (and when a node that predates it first starts), kept with the Raft
    /// state and gone with it. A node started on a wiped or replaced data dir has
    /// another, which is how the cluster tells it from the node it knew.
    pub fn disk_id(&self) -> Result<String, DbError> {
        if let Some(id) = self.get(CF_RAFT_META, KEY_DISK_ID)? {
            return Ok(String::from_utf8_lossy(&id).into_owned());
        }
        let id = hex::encode(rand::random::<[u8; 16]>());
        self.adopt_disk_id(&id)?;
        Ok(id)
    }

    /// Make `id` this disk's identity (synced): a new one, or, restoring a cluster from
    /// one node's archive, the one the membership records for the node it now serves.
    pub fn adopt_disk_id(&self, id: &str) -> Result<(), DbError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_RAFT_META)?, KEY_DISK_ID, id.as_bytes());
        self.write(batch, true)
    }

    /// Write a batch, synced to disk when `sync` is set.
    pub fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), DbError> {
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(sync);
        Ok(self.inner.write_opt(batch, &wo)?)
    }

    /// A SHA-256 over every replicated table's keys and values, in order: two nodes that
    /// applied the same log have the same digest.
    pub fn state_digest(&self) -> Result<String, DbError> {
        let snap = self.inner.snapshot();
        let mut h = Sha256::new();
        for table in Table::ALL {
            h.update([table.index()]);
            for item in snap.iterator_cf(self.cf(table.name())?, IteratorMode::Start) {
                let (k, v) = item?;
                h.update((k.len() as u32).to_be_bytes());
                h.update(&k);
                h.update((v.len() as u32).to_be_bytes());
                h.update(&v);
            }
        }
        Ok(hex::encode(h.finalize()))
    }

    /// Compact the Raft log column family (after a purge, to give the space back now).
    pub fn compact_log(&self) {
        if let Ok(cf) = self.cf(CF_LOG) {
            self.inner
                .compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
        }
    }

    /// Approximate on-disk size of the Raft log column family, in bytes.
    pub fn log_size_bytes(&self) -> u64 {
        self.cf(CF_LOG)
            .ok()
            .and_then(|cf| {
                self.inner
                    .property_int_value_cf(cf, "rocksdb.total-sst-files-size")
                    .ok()
                    .flatten()
                    .zip(
                        self.inner
                            .property_int_value_cf(cf, "rocksdb.size-all-mem-tables")
                            .ok()
                            .flatten(),
                    )
                    .map(|(a, b)| a + b)
            })
            .unwrap_or(0)
    }
}

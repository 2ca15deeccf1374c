//! The Raft log on RocksDB: entries keyed by big-endian index in `raft_log`; vote,
//! committed and purge pointers in `raft_meta`. Vote and appended entries are written
//! with a synced WAL *before* openraft is told they are durable. RocksDB calls run on
//! tokio's blocking pool, never on the async workers.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, StorageIOError};
use rocksdb::{Direction, IteratorMode, WriteBatch};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::db::{Db, DbError, CF_LOG, CF_RAFT_META};
use super::types::{Entry, LogId, StorageError, TypeConfig, Vote};

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"last_purged";

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn index_of(key: &[u8]) -> Result<u64, DbError> {
    let arr: [u8; 8] = key
        .try_into()
        .map_err(|_| DbError::MissingColumnFamily(format!("log key of {} bytes", key.len())))?;
    Ok(u64::from_be_bytes(arr))
}

fn read_err(e: impl std::error::Error + Send + Sync + 'static) -> StorageError {
    StorageIOError::read_logs(&e).into()
}

fn write_err(e: impl std::error::Error + Send + Sync + 'static) -> StorageError {
    StorageIOError::write_logs(&e).into()
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_else(|e| panic!("raft metadata always serialises: {e}"))
}

/// The Raft log store and its reader (the same cheap handle).
#[derive(Clone)]
pub struct LogStore {
    db: Db,
    /// A background compaction of purged entries is running.
    compacting: Arc<AtomicBool>,
}

impl LogStore {
    pub fn new(db: Db) -> Self {
        LogStore {
            db,
            compacting: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Give the space of purged entries back, off openraft's core loop: a compaction can
    /// take long enough to delay heartbeats into elections if purge waited for it. At
    /// most one runs at a time; the next purge's covers what a skipped one would have.
    fn compact_in_background(&self, up_to: u64) {
        if self.compacting.swap(true, Ordering::AcqRel) {
            return;
        }
        let (db, flag) = (self.db.clone(), self.compacting.clone());
        tokio::task::spawn_blocking(move || {
            if let Ok(cf) = db.cf(CF_LOG) {
                db.raw()
                    .compact_range_cf(cf, None::<&[u8]>, Some(&index_key(up_to)));
            }
            flag.store(false, Ordering::Release);
        });
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&Db) -> Result<T, StorageError> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| StorageError::from(StorageIOError::read_logs(&e)))?
    }

    fn meta<T: DeserializeOwned>(db: &Db, key: &[u8]) -> Result<Option<T>, StorageError> {
        db.get_json(CF_RAFT_META, key).map_err(read_err)
    }

    fn put_meta<T: Serialize>(db: &Db, key: &[u8], v: &T, sync: bool) -> Result<(), StorageError> {
        let mut b = WriteBatch::default();
        b.put_cf(db.cf(CF_RAFT_META).map_err(write_err)?, key, to_json(v));
        db.write(b, sync).map_err(write_err)
    }

    fn entries_in(db: &Db, start: u64, end: Option<u64>) -> Result<Vec<Entry>, StorageError> {
        let cf = db.cf(CF_LOG).map_err(read_err)?;
        let mut out = Vec::new();
        let start_key = index_key(start);
        for item in db
            .raw()
            .iterator_cf(cf, IteratorMode::From(&start_key, Direction::Forward))
        {
            let (k, v) = item.map_err(read_err)?;
            let idx = index_of(&k).map_err(read_err)?;
            if end.is_some_and(|e| idx >= e) {
                break;
            }
            let entry: Entry = serde_json::from_slice(&v).map_err(read_err)?;
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(e) => Some(e + 1),
            Bound::Excluded(e) => Some(*e),
            Bound::Unbounded => None,
        };
        self.blocking(move |db| Self::entries_in(db, start, end))
            .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        self.blocking(|db| {
            let last_purged: Option<LogId> = Self::meta(db, KEY_PURGED)?;
            let cf = db.cf(CF_LOG).map_err(read_err)?;
            let last = match db.raw().iterator_cf(cf, IteratorMode::End).next() {
                None => None,
                Some(item) => {
                    let (_, v) = item.map_err(read_err)?;
                    let e: Entry = serde_json::from_slice(&v).map_err(read_err)?;
                    Some(e.log_id)
                }
            };
            Ok(LogState {
                last_purged_log_id: last_purged,
                last_log_id: last.or(last_purged),
            })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let vote = *vote;
        self.blocking(move |db| {
            Self::put_meta(db, KEY_VOTE, &vote, true)
                .map_err(|e| StorageIOError::write_vote(&e).into())
        })
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.blocking(|db| Self::meta(db, KEY_VOTE)).await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not synced: openraft can recover the committed index from a quorum; this only
        // lets a restarted node re-apply its log before it hears from the leader.
        self.blocking(move |db| Self::put_meta(db, KEY_COMMITTED, &committed, false))
            .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        self.blocking(|db| Ok(Self::meta::<Option<LogId>>(db, KEY_COMMITTED)?.flatten()))
            .await
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let res = self
            .blocking(move |db| {
                let cf = db.cf(CF_LOG).map_err(write_err)?;
                let mut b = WriteBatch::default();
                for e in &entries {
                    b.put_cf(cf, index_key(e.log_id.index), to_json(e));
                }
                // Synced: the entries are durable before openraft hears of it.
                db.write(b, true).map_err(write_err)
            })
            .await;
        match &res {
            Ok(()) => callback.log_io_completed(Ok(())),
            Err(e) => callback.log_io_completed(Err(std::io::Error::other(e.to_string()))),
        }
        res
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.blocking(move |db| {
            let cf = db.cf(CF_LOG).map_err(write_err)?;
            let mut b = WriteBatch::default();
            b.delete_range_cf(cf, index_key(log_id.index), index_key(u64::MAX));
            b.delete_cf(cf, index_key(u64::MAX));
            db.write(b, true).map_err(write_err)
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.blocking(move |db| {
            // Record the pointer first (synced), then drop the entries.
            Self::put_meta(db, KEY_PURGED, &log_id, true)?;
            let cf = db.cf(CF_LOG).map_err(write_err)?;
            let mut b = WriteBatch::default();
            b.delete_range_cf(cf, index_key(0), index_key(log_id.index + 1));
            db.write(b, false).map_err(write_err)?;
            Ok(())
        })
        .await?;
        self.compact_in_background(log_id.index + 1);
        Ok(())
    }
}

//! Which DAGs apply wrote, and when: a bounded log of the keys of the `dags` table that
//! each apply changed, numbered by a version that moves once per such apply (and once per
//! snapshot install, which changes everything). The leader's scheduler asks what changed
//! since the version it last learnt at and reads only those DAGs; it reads the whole table
//! only when it has learnt nothing yet or the log no longer reaches back that far. So a
//! scheduler pass costs the DAGs written since the last one, not every stored DAG.
//!
//! Hand-written: a ring of recent keys with a floor is a few lines, and no crate keeps a
//! change feed over our own apply.

use std::collections::{BTreeSet, VecDeque};

/// The most keys the log holds; older ones are dropped, and a reader that had not seen
/// them reads the whole table instead.
pub const MAX_KEPT: usize = 65_536;

/// The change log (see the module docs).
#[derive(Debug, Default)]
pub struct DagChanges {
    version: u64,
    /// Every change after `floor`, oldest first: (the version it made, the key).
    log: VecDeque<(u64, Vec<u8>)>,
    /// Changes at or below this version may be missing from `log`.
    floor: u64,
}

/// What changed since a version (see [`DagChanges::since`]).
#[derive(Debug, PartialEq, Eq)]
pub enum DagsSince {
    /// Nothing: what was read at that version is still what is stored.
    Unchanged,
    /// These keys (each once, in key order) were written; read them at or after
    /// `version`.
    Keys { version: u64, keys: Vec<Vec<u8>> },
    /// Unknown which: read the whole table at or after `version`.
    All { version: u64 },
}

impl DagChanges {
    /// Record one apply's written keys, after they are in the database. An apply that
    /// wrote no DAG changes nothing.
    pub fn record(&mut self, keys: impl IntoIterator<Item = Vec<u8>>) {
        let mut keys = keys.into_iter().peekable();
        if keys.peek().is_none() {
            return;
        }
        self.version += 1;
        let version = self.version;
        self.log.extend(keys.map(|k| (version, k)));
        while self.log.len() > MAX_KEPT {
            if let Some((v, _)) = self.log.pop_front() {
                self.floor = v;
            }
        }
    }

    /// Everything may have changed (a snapshot was installed), once it is in the
    /// database.
    pub fn all_changed(&mut self) {
        self.version += 1;
        self.log.clear();
        self.floor = self.version;
    }

    /// What changed after `seen` (`None`: nothing learnt yet). Read the keys (or the
    /// table) after this returns: they are then at least as new as the version returned.
    pub fn since(&self, seen: Option<u64>) -> DagsSince {
        let version = self.version;
        match seen {
            Some(v) if v == version => DagsSince::Unchanged,
            Some(v) if v >= self.floor && v < version => {
                // The log is in version order: the changes after `v` are its tail.
                let start = self.log.partition_point(|(at, _)| *at <= v);
                let keys: BTreeSet<&Vec<u8>> = self.log.range(start..).map(|(_, k)| k).collect();
                DagsSince::Keys {
                    version,
                    keys: keys.into_iter().cloned().collect(),
                }
            }
            _ => DagsSince::All { version },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(ks: &[&str]) -> Vec<Vec<u8>> {
        ks.iter().map(|k| k.as_bytes().to_vec()).collect()
    }

    #[test]
    fn a_reader_gets_each_key_written_since_its_version_once() {
        let mut c = DagChanges::default();
        assert_eq!(c.since(None), DagsSince::All { version: 0 });
        assert_eq!(c.since(Some(0)), DagsSince::Unchanged);
        c.record(keys(&["b", "a"]));
        c.record(Vec::new());
        c.record(keys(&["a", "c"]));
        assert_eq!(
            c.since(Some(0)),
            DagsSince::Keys {
                version: 2,
                keys: keys(&["a", "b", "c"])
            }
        );
        assert_eq!(
            c.since(Some(1)),
            DagsSince::Keys {
                version: 2,
                keys: keys(&["a", "c"])
            }
        );
        assert_eq!(c.since(Some(2)), DagsSince::Unchanged);
        // A version this log never gave (another store's): read everything.
        assert_eq!(c.since(Some(9)), DagsSince::All { version: 2 });
    }

    #[test]
    fn a_reader_behind_what_the_log_keeps_or_a_snapshot_reads_everything() {
        let mut c = DagChanges::default();
        for i in 0..=MAX_KEPT {
            c.record([format!("{i:06}").into_bytes()]);
        }
        let newest = MAX_KEPT as u64 + 1;
        assert_eq!(c.since(Some(0)), DagsSince::All { version: newest });
        // Version 1's key was dropped; a reader at 1 needs only what came after it.
        match c.since(Some(1)) {
            DagsSince::Keys { version, keys } => {
                assert_eq!(version, newest);
                assert_eq!(keys.len(), MAX_KEPT);
            }
            other => panic!("expected keys, got {other:?}"),
        }
        c.all_changed();
        assert_eq!(
            c.since(Some(newest)),
            DagsSince::All {
                version: newest + 1
            }
        );
        assert_eq!(c.since(Some(newest + 1)), DagsSince::Unchanged);
        c.record(keys(&["x"]));
        assert_eq!(
            c.since(Some(newest + 1)),
            DagsSince::Keys {
                version: newest + 2,
                keys: keys(&["x"])
            }
        );
    }
}

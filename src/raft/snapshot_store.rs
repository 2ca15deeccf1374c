//! The snapshot format and where a node keeps its snapshots: files under
//! `<db dir>/snapshots/`, written and read as streams, so a snapshot is never whole in
//! memory, nor one value in RocksDB (where it went through the WAL and a memtable, and
//! came back whole for every follower it was sent to).
//!
//! Format (the replicated protocol's, unchanged since protocol 1; fixtures in
//! `tests/fixtures/protocol`): the magic bytes `ORCSNAP1`, then records of
//! `table index (u8) | key length (u32 BE) | key | value length (u32 BE) | value`.
//!
//! Files: `<last index>-<nanos>.snap` (both 20 digits, so names sort by index) is a
//! snapshot (the current one is named in RocksDB, next to its metadata, and only after
//! the file is durable); `*.part` one being written. A snapshot being received is an
//! unnamed file until it is installed. Building and installing may run at once (openraft
//! builds in a task of its own), so a commit removes only the snapshots that sort
//! before the one it commits: one being installed (newer than anything a build can
//! cover) or being built stays. [`SnapshotFiles::commit_lock`] orders commits and the
//! reads of the current snapshot; whatever the metadata does not name goes at start.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::state::Table;

pub const MAGIC: &[u8] = b"ORCSNAP1";

/// One record: which table, its key, its value.
pub type Record = (Table, Vec<u8>, Vec<u8>);

/// The directory of a node's snapshot files.
#[derive(Debug, Clone)]
pub struct SnapshotFiles {
    dir: PathBuf,
    commit: std::sync::Arc<std::sync::Mutex<()>>,
}

impl SnapshotFiles {
    /// The snapshot directory beside the database's files (created, 0700).
    pub fn open(db_dir: &Path) -> io::Result<SnapshotFiles> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = db_dir.join("snapshots");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        // The new directory's entry is durable before a snapshot in it is named current.
        File::open(db_dir)?.sync_all()?;
        Ok(SnapshotFiles {
            dir,
            commit: Default::default(),
        })
    }

    /// Held while a snapshot becomes the current one and older files go.
    pub fn commit_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.commit.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh name for a snapshot up to log index `index`.
    pub fn new_name(index: Option<u64>) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("{:020}-{nanos:020}.snap", index.unwrap_or(0))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Write snapshot `name` through `fill` (records after the magic bytes), durably:
    /// a `.part` file, synced, renamed, and the directory synced. Returns the file,
    /// open for reading from its start.
    pub fn write(
        &self,
        name: &str,
        fill: impl FnOnce(&mut SnapshotWriter<'_>) -> io::Result<()>,
    ) -> io::Result<File> {
        self.write_through(name, |out| {
            out.write_all(MAGIC)?;
            fill(&mut SnapshotWriter { out })
        })
    }

    /// Copy a received snapshot (any readable stream) into snapshot `name`, durably.
    /// Returns the file, open for reading from its start.
    pub fn write_from(&self, name: &str, mut from: impl Read) -> io::Result<File> {
        self.write_through(name, |out| io::copy(&mut from, out).map(|_| ()))
    }

    fn write_through(
        &self,
        name: &str,
        fill: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
    ) -> io::Result<File> {
        use std::io::Seek;
        let part = self.dir.join(format!("{name}.part"));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&part)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        fill(&mut out)?;
        let mut file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&part, self.dir.join(name))?;
        File::open(&self.dir)?.sync_all()?;
        file.rewind()?;
        Ok(file)
    }

    /// A new unnamed file to receive a snapshot into (read and write; gone when
    /// closed).
    pub fn receiving(&self) -> io::Result<File> {
        tempfile::tempfile_in(&self.dir)
    }

    /// Remove the snapshots that sort before `keep` (the one just committed): never
    /// one still being built or installed, which sorts after it. An open handle (a
    /// snapshot being sent) still reads a removed file to its end.
    pub fn remove_older_than(&self, keep: &str) {
        self.remove(|name| name.ends_with(".snap") && name < keep);
    }

    /// At start, when nothing is being written: remove every file but `keep` (what a
    /// crash left half written included).
    pub fn remove_all_but(&self, keep: Option<&str>) {
        self.remove(|name| Some(name) != keep);
    }

    fn remove(&self, doomed: impl Fn(&str) -> bool) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            if doomed(&e.file_name().to_string_lossy()) {
                if let Err(err) = std::fs::remove_file(e.path()) {
                    tracing::warn!(file = %e.path().display(), error = %err,
                                   "cannot remove an old snapshot file");
                }
            }
        }
    }
}

/// Writes records of a snapshot.
pub struct SnapshotWriter<'a> {
    out: &'a mut dyn Write,
}

impl SnapshotWriter<'_> {
    pub fn record(&mut self, table: Table, key: &[u8], value: &[u8]) -> io::Result<()> {
        let len = |n: usize| {
            u32::try_from(n)
                .map(u32::to_be_bytes)
                .map_err(|_| io::Error::other("a key or value over 4 GiB"))
        };
        self.out.write_all(&[table.index()])?;
        self.out.write_all(&len(key.len())?)?;
        self.out.write_all(key)?;
        self.out.write_all(&len(value.len())?)?;
        self.out.write_all(value)
    }
}

/// Reads the records of a snapshot from a stream, refusing anything malformed.
pub struct SnapshotReader<R: Read> {
    input: BufReader<R>,
    /// Bytes read so far (for messages).
    pos: u64,
}

impl<R: Read> SnapshotReader<R> {
    /// Check the magic bytes; the records follow.
    pub fn new(input: R) -> Result<Self, String> {
        let mut r = SnapshotReader {
            input: BufReader::with_capacity(1 << 20, input),
            pos: 0,
        };
        let mut magic = [0u8; 8];
        r.exact(&mut magic)
            .ok()
            .filter(|_| magic[..] == *MAGIC)
            .ok_or("snapshot does not start with the expected magic bytes")?;
        Ok(r)
    }

    fn exact(&mut self, buf: &mut [u8]) -> Result<(), String> {
        self.input.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => format!("snapshot truncated at byte {}", self.pos),
            _ => format!("cannot read the snapshot at byte {}: {e}", self.pos),
        })?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn bytes(&mut self) -> Result<Vec<u8>, String> {
        let mut len = [0u8; 4];
        self.exact(&mut len)?;
        let len = u32::from_be_bytes(len) as usize;
        // Read what is there, growing as it comes: a length field is not trusted to
        // size an allocation.
        let mut out = Vec::new();
        let got = (&mut self.input)
            .take(len as u64)
            .read_to_end(&mut out)
            .map_err(|e| format!("cannot read the snapshot at byte {}: {e}", self.pos))?;
        if got < len {
            return Err(format!(
                "snapshot truncated at byte {}",
                self.pos + got as u64
            ));
        }
        self.pos += len as u64;
        Ok(out)
    }

    fn next_record(&mut self) -> Result<Option<Record>, String> {
        let mut t = [0u8; 1];
        match self.input.read(&mut t) {
            Ok(0) => return Ok(None),
            Ok(_) => self.pos += 1,
            Err(e) => return Err(format!("cannot read the snapshot: {e}")),
        }
        let table =
            Table::from_index(t[0]).ok_or_else(|| format!("unknown table index {}", t[0]))?;
        let key = self.bytes()?;
        let value = self.bytes()?;
        Ok(Some((table, key, value)))
    }
}

impl<R: Read> Iterator for SnapshotReader<R> {
    type Item = Result<Record, String>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_record().transpose()
    }
}

/// Parse a whole snapshot held in memory (tests and fixtures).
pub fn parse_snapshot(data: &[u8]) -> Result<Vec<Record>, String> {
    SnapshotReader::new(data)?.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_written_are_read_back_and_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let files = SnapshotFiles::open(dir.path()).unwrap();
        let name = SnapshotFiles::new_name(Some(7));
        let mut written = files
            .write(&name, |w| {
                w.record(Table::ALL[0], b"k1", b"v1")?;
                w.record(Table::ALL[1], b"", &[9u8; 3000])
            })
            .unwrap();
        let mut data = Vec::new();
        written.read_to_end(&mut data).unwrap();
        assert_eq!(data, std::fs::read(files.path(&name)).unwrap());
        let records = parse_snapshot(&data).unwrap();
        assert_eq!(
            records,
            [
                (Table::ALL[0], b"k1".to_vec(), b"v1".to_vec()),
                (Table::ALL[1], Vec::new(), vec![9u8; 3000])
            ]
        );
        let err = parse_snapshot(&data[..data.len() - 1]).unwrap_err();
        assert!(err.contains("truncated"), "{err}");
        // A length field far beyond the data is a truncation, not an allocation.
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&[Table::ALL[0].index(), 0xff, 0xff, 0xff, 0xff]);
        assert!(parse_snapshot(&huge).unwrap_err().contains("truncated"));
        // Names sort by index (then time), whatever the number of digits.
        let other = SnapshotFiles::new_name(Some(10));
        assert!(name < other && SnapshotFiles::new_name(Some(9)) < other);
        files.write(&other, |_| Ok(())).unwrap();
        let newer = SnapshotFiles::new_name(Some(11));
        files.write(&newer, |_| Ok(())).unwrap();
        drop(files.receiving().unwrap());
        let part = files.path("x.snap.part");
        std::fs::write(&part, b"half").unwrap();
        let left = || -> Vec<String> {
            let mut names: Vec<String> = std::fs::read_dir(dir.path().join("snapshots"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        // While running, a commit removes only older snapshots: a newer one (being
        // installed) and one being written stay.
        files.remove_older_than(&other);
        assert_eq!(
            left(),
            [other.clone(), newer.clone(), "x.snap.part".to_string()]
        );
        // At start, nothing is being written.
        files.remove_all_but(Some(&other));
        assert_eq!(left(), [other]);
    }
}

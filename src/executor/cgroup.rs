//! Per-attempt cgroups (v2): each shell attempt runs in a cgroup of its own, so every
//! process it starts dies with it — also one that left its process group (`setsid`, a
//! double fork), which a process-group kill misses and which would otherwise run on as a
//! zombie task after a cancel, a timeout, a fence or the node's death.
//!
//! Layout: the node creates `<its own cgroup>/orchestrator-<hash of its data dir>-<random>`
//! (one per run of a node) and, where that parent may enable them, the `pids` and
//! `memory` controllers for its children. The fence keeper, which outlives its node,
//! removes it after the node is gone; a restarted node sweeps what a previous run of the
//! same data dir left (kills it, removes it). A parent per run, not per data dir, so a
//! keeper tidying after its node never removes the parent its restarted node uses. An attempt's child process creates and
//! joins `pg<PID>` under it between fork and exec (its pid is its process group id), so
//! the cgroup of a process group is known from the pgid alone: the executor, the fence
//! keeper and the restart sweep all kill "group PGID" the same way ([`super::kill_group`]).
//!
//! Where the node cannot create cgroups or move a process into one (no cgroup v2 mount,
//! not root, a read-only `/sys/fs/cgroup`; tried at start with `/bin/true`) attempts run
//! without, in their process group only, and the node says so once at start. An attempt
//! whose child cannot join its cgroup later still runs, in its group only, with a
//! warning: a cgroup is a second net under the process-group kill, not a reason to fail
//! work.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{info, warn};

/// Longest parent path the child's fixed buffer takes (with `/pgNNNNNNNNNN/cgroup.procs`).
const MAX_PARENT_LEN: usize = 3900;

/// The node's parent cgroup for its attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroups {
    parent: PathBuf,
    /// Whether `pids.max` and `memory.max` exist in an attempt's cgroup.
    pids: bool,
    memory: bool,
}

impl Cgroups {
    /// A parent that already exists (the fence keeper, told by its node).
    pub fn at(parent: PathBuf) -> Cgroups {
        Cgroups {
            parent,
            pids: false,
            memory: false,
        }
    }

    pub fn parent(&self) -> &Path {
        &self.parent
    }

    /// Create (or reuse) this node's parent cgroup. `None`, said once in the log, where
    /// the node cannot.
    pub fn setup(data_dir: &Path) -> Option<Cgroups> {
        match Self::try_setup(data_dir) {
            Ok(c) => {
                info!(parent = %c.parent.display(), pids = c.pids, memory = c.memory,
                      "shell attempts run in cgroups of their own");
                Some(c)
            }
            Err(why) => {
                info!(reason = %why, "shell attempts run without cgroups (process groups only): \
                      a process that leaves its group can outlive its attempt");
                None
            }
        }
    }

    fn try_setup(data_dir: &Path) -> Result<Cgroups, String> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        let (root, mount) =
            cgroup2_mount(&mountinfo).ok_or("no cgroup v2 file system is mounted")?;
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        let own = own_cgroup(&own).ok_or("this process is in no cgroup v2")?;
        // The mount shows the hierarchy from `root` down (a container's view without a
        // cgroup namespace): our cgroup's place under the mount point is below it.
        let own = match own.strip_prefix(root.as_str()) {
            Some(below) if below.is_empty() || below.starts_with('/') => below,
            _ => own,
        };
        let own = mount.join(own.trim_start_matches('/'));
        if !own.join("cgroup.procs").exists() {
            return Err(format!("this process's cgroup is not at {}", own.display()));
        }
        let canonical = data_dir
            .canonicalize()
            .unwrap_or_else(|_| data_dir.to_path_buf());
        // Random, not the pid: a restarted node may get its predecessor's pid (a
        // container's fixed pid), and the predecessor's keeper removes its parent.
        let name = format!("{}{:08x}", run_prefix(&canonical), rand::random::<u32>());
        let parent = own.join(name);
        if parent.as_os_str().len() > MAX_PARENT_LEN {
            return Err(format!("{} is too long a path", parent.display()));
        }
        std::fs::create_dir(&parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        // Controllers for the attempts, where the node's own cgroup has them to give.
        let available =
            std::fs::read_to_string(parent.join("cgroup.controllers")).unwrap_or_default();
        let mut c = Cgroups::at(parent);
        for ctl in ["pids", "memory"] {
            if available.split_whitespace().any(|a| a == ctl)
                && std::fs::write(c.parent.join("cgroup.subtree_control"), format!("+{ctl}"))
                    .is_ok()
            {
                match ctl {
                    "pids" => c.pids = true,
                    _ => c.memory = true,
                }
            }
        }
        // Creating is not moving (that needs write access to the common ancestor's
        // `cgroup.procs`): move a real process before promising anything.
        if let Err(e) = c.try_move() {
            remove_tree(&c.parent);
            return Err(format!(
                "cannot move a process into a cgroup under {}: {e}",
                own.display()
            ));
        }
        Ok(c)
    }

    /// Run `/bin/true` in a cgroup of its own, as an attempt would be.
    fn try_move(&self) -> std::io::Result<()> {
        use std::os::unix::process::CommandExt;
        let join = self.for_child(0, 0);
        let mut command = std::process::Command::new("/bin/true");
        command.process_group(0);
        // SAFETY: `join` only makes async-signal-safe calls (see `ChildCgroup::join`).
        unsafe {
            command.pre_exec(move || join.join());
        }
        // A failed join fails the spawn: the child's error comes back through exec's pipe.
        let mut child = command.spawn()?;
        let pgid = i32::try_from(child.id()).unwrap_or(0);
        let waited = child.wait();
        remove_tree(&self.group_dir(pgid));
        waited.map(|_| ())
    }

    /// Whether group `pgid` has its cgroup (its child created it before exec).
    pub fn has_group(&self, pgid: i32) -> bool {
        self.group_dir(pgid).is_dir()
    }

    fn group_dir(&self, pgid: i32) -> PathBuf {
        self.parent.join(format!("pg{pgid}"))
    }

    /// Kill every process in group `pgid`'s cgroup. Synchronous and cheap: the kernel
    /// signals them (`cgroup.kill`, Linux 5.14+); on older kernels each listed process
    /// is killed, a few rounds so that forks racing the kill are caught.
    pub fn kill(&self, pgid: i32) {
        let dir = self.group_dir(pgid);
        if std::fs::write(dir.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        // Frozen, nothing in it can fork while its processes are listed and killed (a
        // frozen process still dies of SIGKILL once thawed).
        let frozen = std::fs::write(dir.join("cgroup.freeze"), "1").is_ok();
        for _ in 0..8 {
            let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) else {
                break;
            };
            let pids: Vec<i32> = procs
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                // SAFETY: kill(2) only sends a signal.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            if frozen {
                break;
            }
        }
        if frozen {
            let _ = std::fs::write(dir.join("cgroup.freeze"), "0");
        }
    }

    /// Remove group `pgid`'s cgroup once empty, after [`super::kill_group`] (waiting up
    /// to two seconds for the kernel to reap what the kill left).
    pub async fn release(&self, pgid: i32) {
        let dir = self.group_dir(pgid);
        // Cgroups the attempt made inside its own (it may, as their owner) go first.
        for sub in subdirs(&dir) {
            remove_tree(&sub);
        }
        for _ in 0..200 {
            match std::fs::remove_dir(&dir) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                // EBUSY while a killed process is not yet gone.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        warn!(cgroup = %dir.display(), "an attempt's cgroup is still busy after its kill; left for the next sweep");
    }

    /// At the node's start: kill and remove what previous runs of this data dir left
    /// (a keeper that died with its node, or one still tidying).
    pub fn sweep(&self, data_dir: &Path) {
        let (Some(above), Some(own)) = (self.parent.parent(), self.parent.file_name()) else {
            return;
        };
        let canonical = data_dir
            .canonicalize()
            .unwrap_or_else(|_| data_dir.to_path_buf());
        let prefix = run_prefix(&canonical);
        let Ok(entries) = std::fs::read_dir(above) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            if name != own && name.to_str().is_some_and(|n| n.starts_with(&prefix)) {
                Cgroups::at(e.path()).remove_all();
            }
        }
    }

    /// Kill every attempt cgroup under this parent, remove them, then the parent
    /// (synchronous: the keeper's last act, and the sweep's).
    pub fn remove_all(&self) {
        if let Ok(entries) = std::fs::read_dir(&self.parent) {
            for e in entries.flatten() {
                let Some(pgid) = e
                    .file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("pg"))
                    .and_then(|n| n.parse::<i32>().ok())
                else {
                    continue;
                };
                let populated = std::fs::read_to_string(e.path().join("cgroup.events"))
                    .is_ok_and(|ev| ev.lines().any(|l| l == "populated 1"));
                if populated {
                    warn!(pgid, cgroup = %e.path().display(), "killing an attempt's cgroup its node left");
                    self.kill(pgid);
                }
                remove_tree(&e.path());
            }
        }
        remove_tree(&self.parent);
    }

    /// What the child needs to join its cgroup between fork and exec, prepared here so
    /// that the child only copies bytes and makes syscalls.
    pub fn for_child(&self, pids_max: u64, memory_max: u64) -> ChildCgroup {
        let mut parent = [0u8; MAX_PARENT_LEN];
        let bytes = self.parent.as_os_str().as_bytes();
        parent[..bytes.len()].copy_from_slice(bytes);
        ChildCgroup {
            parent,
            parent_len: bytes.len(),
            pids_max: if self.pids { pids_max } else { 0 },
            memory_max: if self.memory { memory_max } else { 0 },
        }
    }
}

/// A child's way into its cgroup (see [`ChildCgroup::join`]).
#[derive(Clone, Copy)]
pub struct ChildCgroup {
    parent: [u8; MAX_PARENT_LEN],
    parent_len: usize,
    pids_max: u64,
    memory_max: u64,
}

/// A NUL-terminated path in a fixed buffer: `parent/pg<pid>[/file]`.
struct PathBuf0 {
    buf: [u8; MAX_PARENT_LEN + 64],
    len: usize,
}

impl PathBuf0 {
    fn push(&mut self, bytes: &[u8]) {
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }
    /// This path with `file` appended, NUL-terminated.
    fn with(&self, file: &[u8]) -> PathBuf0 {
        let mut p = PathBuf0 {
            buf: self.buf,
            len: self.len,
        };
        p.push(file);
        p.buf[p.len] = 0;
        p
    }
    fn ptr(&self) -> *const libc::c_char {
        self.buf.as_ptr().cast()
    }
}

/// `n` in decimal into `out`; the digits used.
fn decimal(mut n: u64, out: &mut [u8; 20]) -> &[u8] {
    let mut i = out.len();
    loop {
        i -= 1;
        out[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &out[i..];
        }
    }
}

/// Write `bytes` to the file at `path` (NUL-terminated). Async-signal-safe.
fn write_file(path: &PathBuf0, bytes: &[u8]) -> std::io::Result<()> {
    // SAFETY: `path` is NUL-terminated and outlives the calls; `bytes` is valid.
    unsafe {
        let fd = libc::open(path.ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = libc::write(fd, bytes.as_ptr().cast(), bytes.len());
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if n < 0 {
            return Err(err);
        }
    }
    Ok(())
}

impl ChildCgroup {
    /// Whether the cgroup it joins holds its processes (`pids.max` is set).
    pub fn holds_processes(&self) -> bool {
        self.pids_max > 0
    }

    /// In the child, after fork and before exec (and before it drops to the attempt's
    /// user): create `pg<own pid>`, set its limits, and move into it. Only
    /// async-signal-safe calls, no allocation.
    pub fn join(&self) -> std::io::Result<()> {
        let mut dir = PathBuf0 {
            buf: [0; MAX_PARENT_LEN + 64],
            len: 0,
        };
        dir.push(&self.parent[..self.parent_len]);
        dir.push(b"/pg");
        let mut digits = [0u8; 20];
        // SAFETY: getpid(2) has no preconditions.
        let pid = unsafe { libc::getpid() };
        dir.push(decimal(pid as u64, &mut digits));
        let at = dir.with(b"");
        // SAFETY: `at` is NUL-terminated.
        if unsafe { libc::mkdir(at.ptr(), 0o755) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(e);
            }
        }
        if self.pids_max > 0 {
            write_file(&dir.with(b"/pids.max"), decimal(self.pids_max, &mut digits))?;
        }
        if self.memory_max > 0 {
            write_file(
                &dir.with(b"/memory.max"),
                decimal(self.memory_max, &mut digits),
            )?;
        }
        // "0" moves the writing process itself.
        write_file(&dir.with(b"/cgroup.procs"), b"0")
    }
}

/// The cgroup v2 file system's mount: the hierarchy's path it shows (its root) and its
/// mount point, from `/proc/self/mountinfo`.
fn cgroup2_mount(mountinfo: &str) -> Option<(String, PathBuf)> {
    mountinfo.lines().find_map(|l| {
        // id parent major:minor root mount-point options [optional...] - fstype source ...
        let (left, right) = l.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mut fields = left.split_whitespace().skip(3);
        let root = fields.next()?.trim_end_matches('/').to_string();
        Some((root, PathBuf::from(fields.next()?)))
    })
}

/// This process's cgroup v2 path, from `/proc/self/cgroup` (the `0::` line).
fn own_cgroup(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

/// The start of the parent cgroup's name of every run of the node at `data_dir`.
fn run_prefix(canonical_data_dir: &Path) -> String {
    format!(
        "orchestrator-{:016x}-",
        fnv1a(canonical_data_dir.as_os_str().as_bytes())
    )
}

/// The directories in `dir` (in a cgroup: its child cgroups).
fn subdirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Remove a cgroup and the cgroups inside it, each waiting up to a second for killed
/// processes to be reaped (EBUSY until then). Best effort: what stays is removed by the
/// next sweep.
fn remove_tree(dir: &Path) {
    for sub in subdirs(dir) {
        remove_tree(&sub);
    }
    for _ in 0..100 {
        match std::fs::remove_dir(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                std::thread::sleep(Duration::from_millis(10));
            }
            _ => return,
        }
    }
}

/// FNV-1a: a stable name for a data dir (std's hasher is not stable across releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_and_own_path_are_read() {
        let mi = "24 30 0:22 / /sys/fs/cgroup/cpu rw,relatime shared:7 - cgroup cgroup rw,cpu\n\
                  35 30 0:33 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(mi),
            Some((String::new(), PathBuf::from("/sys/fs/cgroup/unified")))
        );
        let docker = "40 30 0:33 /docker/abc /sys/fs/cgroup ro,nosuid - cgroup2 cgroup rw\n";
        assert_eq!(
            cgroup2_mount(docker),
            Some(("/docker/abc".to_string(), PathBuf::from("/sys/fs/cgroup")))
        );
        assert_eq!(
            cgroup2_mount("24 30 0:22 / /x rw - cgroup cgroup rw\n"),
            None
        );
        assert_eq!(
            own_cgroup("4:memory:/a\n0::/system.slice/o.service\n"),
            Some("/system.slice/o.service")
        );
        assert_eq!(own_cgroup("4:memory:/a\n"), None);
    }

    #[test]
    fn numbers_are_written_in_decimal() {
        let mut d = [0u8; 20];
        assert_eq!(decimal(0, &mut d), b"0");
        assert_eq!(decimal(4_294_967_296, &mut d), b"4294967296");
        assert_eq!(decimal(u64::MAX, &mut d), b"18446744073709551615");
    }

    #[test]
    fn a_node_s_parent_name_is_stable() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_ne!(fnv1a(b"/var/lib/o1"), fnv1a(b"/var/lib/o2"));
    }
}

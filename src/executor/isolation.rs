//! The private view of the node a shell attempt gets when it runs as another user:
//! namespaces of its own (mount, PID, IPC, UTS; a network namespace of its tenant's
//! unless the tenant may use the node's), the node's filesystem read-only and without
//! setuid, one tmpfs of
//! `executor.shell_max_disk_bytes` for everything it may write (`/tmp`, `/var/tmp`,
//! `/dev/shm` and its working dir), the host's homes, logs and spools shown empty
//! (`executor.shell_hidden_paths`), a `/proc` that shows its own processes only, and a
//! `/sys` without the cgroup tree (of its own network namespace when it has one).
//!
//! What that buys, beyond the user switch and rlimits of [`super::sandbox`]:
//! - no network (no loopback services of the node, no peer port, no cloud metadata, no
//!   private ranges: the egress policy of `http` tasks cannot be bypassed by `curl`):
//!   a namespace with only a loopback, one per tenant ([`Networks`]), made once and
//!   joined by each of its attempts (making one per attempt cost ~3 ms of every spawn),
//!   so a tenant's attempts share a loopback and abstract Unix sockets with each other,
//!   never with another tenant's or the node;
//! - a disk bound for the whole attempt (a tmpfs, charged to its cgroup's memory where it
//!   has one) instead of RLIMIT_FSIZE's per-file bound, and nothing left on the node's
//!   disk when it ends (the namespace, and its tmpfs, go with its last process);
//! - attempts that share a user (the node-wide `shell_user`) cannot see, signal, trace
//!   or read each other: each is alone in its PID namespace and its files are in its
//!   own tmpfs, which no other mount namespace has;
//! - when the shell ends, the kernel kills everything it left (its namespace's init
//!   ends with it).
//!
//! How (no crate does this between fork and exec with async-signal-safe calls only):
//! the child `std` forks for the attempt unshares the namespaces and forks; its child
//! is PID 1 of the new PID namespace: it sets up the mounts and forks the shell (PID 2,
//! which goes on to exec), then reaps orphans until the shell ends. The shell is not
//! PID 1, so signals it sends itself (`kill $$`) work as anywhere else. The two
//! processes above the shell close every descriptor they hold (the node hears of the
//! exec and sees output from the shell alone); if the shell has not ended within a
//! second, each execs this binary as a reaper ([`REAPER_ARG`], [`reap`]): a fork of the
//! node would otherwise keep the node's whole memory (its secrets included) shared
//! copy-on-write for as long as the attempt runs, and make every page the node writes
//! meanwhile a copy. The reaper waits and ends as the shell did: its
//! exit code, or for a death by signal N exit code 128 + N, as shells report it (a
//! namespace's init cannot die of a signal it sends itself).
//! All three stay in the attempt's process group and cgroup: a kill of the group kills
//! them all.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::sandbox::Limits;

/// What an isolated attempt sees empty unless configured otherwise
/// (`executor.shell_hidden_paths`).
pub const DEFAULT_HIDDEN_PATHS: &[&str] = &[
    "/home",
    "/root",
    "/mnt",
    "/media",
    "/srv",
    "/var/log",
    "/var/mail",
    "/var/spool",
    "/var/backups",
];

/// The scratch space an attempt may fill when none is configured: 1 GiB.
pub const DEFAULT_MAX_DISK_BYTES: u64 = 1 << 30;

/// Everything the child needs, prepared before fork (nothing is allocated after it).
#[derive(Debug)]
pub struct Isolation {
    /// The network namespace to join (None: the node's).
    network: Option<Arc<OwnedFd>>,
    /// `size=…,mode=1777` for the tmpfs mounted on `/tmp`.
    tmpfs_options: CString,
    /// The directories from below `/tmp` (or `/var/tmp`, `/dev/shm`) down to the working
    /// dir, to create in the tmpfs when the working dir lies under one (else empty).
    work_chain: Vec<CString>,
    /// The working dir (the attempt's `HOME`).
    work: CString,
    /// Whether the working dir lies elsewhere: then the tmpfs's `/.home` is bound onto
    /// it (the node created it as the mount point).
    bind_home: bool,
    uid: u32,
    gid: u32,
    /// What the attempt's PID namespace gets as its `pid_max` ([`pid_max_for`]), where
    /// that bounds it.
    pid_max: Option<CString>,
    /// Whether the processes above the shell exec this binary as [`reap`]ers (always,
    /// but in this module's unit tests, whose binary is the test harness).
    exec_reaper: bool,
    /// Whether `/var/run` is a directory of its own, not the usual link to `/run`.
    var_run: bool,
    /// Directories to show empty ([`Isolation::hiding`]).
    hidden: Vec<CString>,
}

const TMP: &CStr = c"/tmp";
/// Where the working dir's space lives in the tmpfs when it is bound elsewhere.
const TMP_HOME: &CStr = c"/tmp/.home";
/// The other world-writable places, bound to directories of the tmpfs.
const SHARED: [(&CStr, &CStr); 2] = [
    (c"/tmp/.var-tmp", c"/var/tmp"),
    (c"/tmp/.dev-shm", c"/dev/shm"),
];

fn cstring(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a path"))
}

impl Isolation {
    /// The isolation of an attempt run as `uid`/`gid` in working dir `work` (absolute),
    /// with at most `limits.disk_bytes` of scratch space (0: [`DEFAULT_MAX_DISK_BYTES`])
    /// and `limits.processes` in its PID namespace where the kernel can bound one, in
    /// network namespace `network` (None: the node's network).
    pub fn new(
        work: &Path,
        uid: u32,
        gid: u32,
        limits: &Limits,
        network: Option<Arc<OwnedFd>>,
    ) -> io::Result<Isolation> {
        let size = match limits.disk_bytes {
            0 => DEFAULT_MAX_DISK_BYTES,
            n => n,
        };
        // Where the working dir really is: a `..` or a symlink into /tmp must take the
        // branch of the directory it lands in.
        let resolved = std::fs::canonicalize(work);
        let work = resolved.as_deref().unwrap_or(work);
        // Under a directory the tmpfs replaces, the working dir is made in the tmpfs.
        let mut work_chain = Vec::new();
        let replaced = std::iter::once(TMP).chain(SHARED.iter().map(|(_, target)| *target));
        for root in replaced {
            let root = Path::new(std::ffi::OsStr::from_bytes(root.to_bytes()));
            if let Ok(rel) = work.strip_prefix(root) {
                let mut dir = root.to_path_buf();
                for part in rel.components() {
                    dir.push(part);
                    work_chain.push(cstring(&dir)?);
                }
                break;
            }
        }
        Ok(Isolation {
            network,
            // Files as well as bytes: one inode per 4 KiB of space, at least 1,024.
            tmpfs_options: CString::new(format!(
                "size={size},nr_inodes={},mode=1777",
                (size / 4096).max(1024)
            ))
            .map_err(|_| io::Error::other("tmpfs options"))?,
            bind_home: work_chain.is_empty(),
            work_chain,
            work: cstring(work)?,
            uid,
            gid,
            pid_max: pid_max_for(limits.processes(true), per_namespace_pid_max())?,
            exec_reaper: !cfg!(test),
            var_run: std::fs::symlink_metadata("/var/run").is_ok_and(|m| m.is_dir()),
            hidden: Vec::new(),
        })
    }

    /// The same, with each of `paths` shown empty: those that are directories (not
    /// symlinks, which a mount would follow) and do not hold the working dir (which
    /// would vanish with them).
    pub fn hiding(mut self, paths: &[std::path::PathBuf]) -> io::Result<Isolation> {
        let work = Path::new(std::ffi::OsStr::from_bytes(self.work.as_bytes()));
        for path in paths.iter().filter(|p| p.is_absolute()) {
            let is_dir = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir());
            // Where it lands, as the working dir is (a parent may be a symlink).
            match std::fs::canonicalize(path) {
                Ok(real) if is_dir && !work.starts_with(&real) => self.hidden.push(cstring(&real)?),
                _ => {}
            }
        }
        Ok(self)
    }

    /// Whether the attempt's process limit holds in its PID namespace, for it alone (not
    /// shared, as RLIMIT_NPROC is, by every attempt of its user).
    pub fn bounds_processes(&self) -> bool {
        self.pid_max.is_some()
    }

    /// Enter the attempt's namespaces and mounts. Runs in the child between fork and
    /// exec, as root, before the user switch; only async-signal-safe calls. Returns in
    /// the process that goes on to exec the shell; the one in between never returns.
    pub fn enter(&self) -> io::Result<()> {
        let flags =
            libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
        // SAFETY: setns(2) with a namespace descriptor held open by `self`, unshare(2):
        // plain syscalls in the single-threaded child.
        if let Some(net) = &self.network {
            check(unsafe { libc::setns(net.as_raw_fd(), libc::CLONE_NEWNET) })?;
        }
        check(unsafe { libc::unshare(flags) })?;
        fork_and_relay(self.exec_reaper)?;
        // PID 1 of the attempt's namespace from here. Its parent goes only by being
        // killed with the group, which kills this process too; belt and braces:
        // SAFETY: prctl(2) with plain integer arguments.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
        self.mount_view()?;
        fork_and_relay(self.exec_reaper)?;
        // The shell, PID 2.
        // SAFETY: chdir(2) with a valid C string.
        check(unsafe { libc::chdir(self.work.as_ptr()) })
    }

    fn mount_view(&self) -> io::Result<()> {
        // Nothing mounted here reaches the node's namespace.
        mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None)?;
        // The whole tree read-only and without setuid, in one call (Linux 5.12+).
        let attr = libc::mount_attr {
            attr_set: libc::MOUNT_ATTR_RDONLY | libc::MOUNT_ATTR_NOSUID,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        // SAFETY: a valid path and a valid, correctly sized attribute struct.
        check(unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                libc::AT_FDCWD,
                c"/".as_ptr(),
                libc::AT_RECURSIVE as libc::c_uint,
                &attr as *const libc::mount_attr,
                std::mem::size_of::<libc::mount_attr>(),
            ) as libc::c_int
        })?;
        // One tmpfs bounds all it may write.
        mount(
            Some(c"tmpfs"),
            TMP,
            Some(c"tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV,
            Some(&self.tmpfs_options),
        )?;
        for (dir, target) in SHARED {
            mkdir(dir, 0o1777)?;
            unless_missing(mount(Some(dir), target, None, libc::MS_BIND, None))?;
        }
        for dir in &self.work_chain {
            mkdir(dir, 0o711)?;
        }
        if self.bind_home {
            mkdir(TMP_HOME, 0o700)?;
            mount(Some(TMP_HOME), &self.work, None, libc::MS_BIND, None)?;
        }
        // SAFETY: chown(2)/chmod(2) with a valid C string.
        check(unsafe { libc::chown(self.work.as_ptr(), self.uid, self.gid) })?;
        check(unsafe { libc::chmod(self.work.as_ptr(), 0o700) })?;
        // Without network, no host service's Unix socket either (they live under /run:
        // DNS resolvers, D-Bus, the journal): an empty, read-only /run. With the node's
        // network the attempt keeps them (and the resolver configuration under /run).
        if self.network.is_some() {
            let runs: &[&CStr] = if self.var_run {
                &[c"/run", c"/var/run"]
            } else {
                &[c"/run"]
            };
            for run in runs {
                unless_missing(show_empty(run))?;
            }
        }
        for dir in &self.hidden {
            unless_missing(show_empty(dir))?;
        }
        // The node's /sys shows the cgroup tree (every attempt's cgroup and what its
        // processes use, other tenants' included) and the node's network interfaces.
        // With a network namespace of its own the attempt gets a sysfs of that namespace
        // (its loopback only; no cgroup tree, which is a mount of its own), or an empty
        // /sys where sysfs cannot be mounted; on the node's network the cgroup tree is
        // shown empty.
        if self.network.is_some() {
            let sysfs = mount(
                Some(c"sysfs"),
                c"/sys",
                Some(c"sysfs"),
                libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                None,
            );
            if sysfs.is_err() {
                unless_missing(show_empty(c"/sys"))?;
            }
        } else {
            unless_missing(show_empty(c"/sys/fs/cgroup"))?;
        }
        // A /proc of this PID namespace: the attempt's own processes only.
        mount(
            Some(c"proc"),
            c"/proc",
            Some(c"proc"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            None,
        )?;
        match &self.pid_max {
            Some(value) => write_file(c"/proc/sys/kernel/pid_max", value.as_bytes()),
            None => Ok(()),
        }
    }
}

/// PIDs below this are handed out only until the namespace's counter first passes it
/// (the kernel's `RESERVED_PIDS`): after that, new PIDs come from `[300, pid_max)` alone.
const RESERVED_PIDS: u64 = 300;

/// The largest `pid_max` the kernel takes (`PID_MAX_LIMIT` on 64-bit).
const PID_MAX_LIMIT: u64 = 4 << 20;

/// The `pid_max` that gives an attempt at least `processes` processes (and threads, as
/// RLIMIT_NPROC counts them) for its whole life and at most `processes` + 298: once its
/// PID counter has passed 300 (after 300 processes, short-lived ones included), new
/// PIDs come from `[300, pid_max)` only, so `processes` + 300; before, PIDs 2 to 299
/// are free too. None where it cannot: no limit, a kernel without a `pid_max` per
/// namespace, or one above what the kernel takes (RLIMIT_NPROC alone bounds those).
fn pid_max_for(processes: u64, per_namespace: bool) -> io::Result<Option<CString>> {
    let value = processes.saturating_add(RESERVED_PIDS);
    if processes == 0 || !per_namespace || value > PID_MAX_LIMIT {
        return Ok(None);
    }
    CString::new(value.to_string())
        .map(Some)
        .map_err(|_| io::Error::other("pid_max"))
}

/// The most host PIDs an isolated attempt limited to `processes` can hold: what its
/// namespace allows ([`pid_max_for`]: `processes` + 298) and the two processes above its
/// shell (the namespace's init and its parent).
pub fn most_pids(processes: u64) -> u64 {
    processes.saturating_add(RESERVED_PIDS)
}

/// Whether this kernel keeps `pid_max` per PID namespace (Linux 6.14 and later). Before,
/// the file is the machine's one limit, and writing it from an attempt's namespace would
/// change it for the whole machine: never written there.
fn per_namespace_pid_max() -> bool {
    static KNOWN: std::sync::LazyLock<bool> =
        std::sync::LazyLock::new(|| kernel_release().is_some_and(|v| v >= (6, 14)));
    *KNOWN
}

/// The running kernel's major and minor version, from uname(2).
fn kernel_release() -> Option<(u32, u32)> {
    // SAFETY: uname(2) fills the zeroed struct; its fields are NUL-terminated.
    let release = unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut u) != 0 {
            return None;
        }
        CStr::from_ptr(u.release.as_ptr())
            .to_string_lossy()
            .into_owned()
    };
    parse_release(&release)
}

/// `6.18.44-generic` → (6, 18).
fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor: String = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Some((major, minor.parse().ok()?))
}

/// Write `bytes` to the file at `path` (which exists). Async-signal-safe.
fn write_file(path: &CStr, bytes: &[u8]) -> io::Result<()> {
    // SAFETY: open(2), write(2), close(2) with a valid path and buffer.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        check(fd)?;
        let written = libc::write(fd, bytes.as_ptr().cast(), bytes.len());
        let error = io::Error::last_os_error();
        libc::close(fd);
        if written != bytes.len() as isize {
            return Err(error);
        }
    }
    Ok(())
}

/// Fork; return in the child, and in the parent become the reaper of the child for
/// good.
fn fork_and_relay(exec: bool) -> io::Result<()> {
    // SAFETY: fork(2) in a single-threaded child of the node.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(()),
        pid if exec => exec_reaper(pid),
        pid => reap(pid),
    }
}

/// The argument that makes this binary the reaper above an isolated shell (`orchestrator
/// __isolation-reaper <pid>`); `main` checks for it before anything else runs.
pub const REAPER_ARG: &CStr = c"__isolation-reaper";

/// How long a process above the shell waits, still a fork of the node, for the shell to
/// end before it execs the reaper: exec'ing this binary costs ~9 ms (twice per attempt),
/// so a short attempt ends first and pays nothing, and a long one holds the node's
/// memory for this long at most.
const REAPER_EXEC_AFTER_MS: libc::c_int = 1000;

/// Become the reaper of `child`: wait up to [`REAPER_EXEC_AFTER_MS`] for it in this
/// process, then exec this binary as its reaper. Only async-signal-safe calls, the
/// arguments built on the stack. Where the exec fails, reap in this process.
fn exec_reaper(child: libc::pid_t) -> ! {
    // SAFETY: close_range(2), pidfd_open(2), poll(2): plain syscalls.
    unsafe {
        // Nothing of the node's stays open here (the output pipes, std's exec-status
        // pipe): the node hears of the exec, and sees output, from the shell alone.
        libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
        let pidfd = libc::syscall(libc::SYS_pidfd_open, child, 0) as libc::c_int;
        if pidfd >= 0 {
            let mut ready = libc::pollfd {
                fd: pidfd,
                events: libc::POLLIN,
                revents: 0,
            };
            if libc::poll(&mut ready, 1, REAPER_EXEC_AFTER_MS) > 0 {
                reap(child);
            }
            libc::close(pidfd);
        }
    }
    // The pid in decimal, NUL-terminated.
    let mut digits = [0u8; 24];
    let mut n = child.unsigned_abs();
    let mut at = digits.len() - 1;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let argv = [
        c"orchestrator".as_ptr(),
        REAPER_ARG.as_ptr(),
        digits[at..].as_ptr().cast(),
        std::ptr::null(),
    ];
    let envp = [std::ptr::null()];
    // SAFETY: execve(2) with NUL-terminated strings and null-terminated arrays.
    unsafe { libc::execve(c"/proc/self/exe".as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    reap(child)
}

/// `main`'s check: this process is a reaper, of the returned pid.
pub fn reaper_of(mut args: impl Iterator<Item = std::ffi::OsString>) -> Option<libc::pid_t> {
    if args.nth(1)?.as_bytes() != REAPER_ARG.to_bytes() {
        return None;
    }
    args.next()?.to_str()?.parse().ok()
}

/// A process above the shell: holds nothing of the node's (its copies of the output
/// pipes, and of `std`'s exec-status pipe where the exec failed, are closed), reaps
/// whatever child it gets (as PID 1, the orphans of the namespace), and when `child`
/// ends, ends with its exit code (128 + N for death by signal N).
pub fn reap(child: libc::pid_t) -> ! {
    // SAFETY: close_range(2), waitpid(2), _exit(2): plain syscalls, async-signal-safe
    // where this runs in a forked child.
    unsafe {
        libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
        let mut status = 0;
        loop {
            let r = libc::waitpid(-1, &mut status, 0);
            if r == child {
                break;
            }
            if r == -1 && *libc::__errno_location() != libc::EINTR {
                libc::_exit(127);
            }
        }
        if libc::WIFEXITED(status) {
            libc::_exit(libc::WEXITSTATUS(status));
        }
        libc::_exit(128 + libc::WTERMSIG(status))
    }
}

/// Network namespaces with only a loopback, one per tenant, made on first use and kept
/// for the node's life.
#[derive(Debug, Clone, Default)]
pub struct Networks {
    by_tenant: Arc<Mutex<HashMap<String, Arc<OwnedFd>>>>,
}

impl Networks {
    /// `tenant`'s network namespace (made now if it has none yet).
    pub fn for_tenant(&self, tenant: &str) -> io::Result<Arc<OwnedFd>> {
        let mut by_tenant = self.by_tenant.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ns) = by_tenant.get(tenant) {
            return Ok(ns.clone());
        }
        // unshare(CLONE_NEWNET) moves only the calling thread: a thread of its own makes
        // the namespace, brings up its loopback and leaves it open behind a descriptor.
        let ns = std::thread::spawn(|| -> io::Result<OwnedFd> {
            // SAFETY: unshare(2) of this thread's network namespace.
            check(unsafe { libc::unshare(libc::CLONE_NEWNET) })?;
            loopback_up()?;
            Ok(std::fs::File::open("/proc/thread-self/ns/net")?.into())
        })
        .join()
        .map_err(|_| io::Error::other("the thread making a network namespace panicked"))??;
        let ns = Arc::new(ns);
        by_tenant.insert(tenant.to_string(), ns.clone());
        Ok(ns)
    }
}

/// Bring up `lo` in a new network namespace: a task may still talk to a server it
/// starts itself.
fn loopback_up() -> io::Result<()> {
    // SAFETY: socket(2), ioctl(2), close(2) with a zeroed, correctly typed request.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        check(fd)?;
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo") {
            *dst = *src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING) as _;
        let r = libc::ioctl(fd, libc::SIOCSIFFLAGS, &req);
        libc::close(fd);
        check(r)
    }
}

fn mount(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> io::Result<()> {
    let ptr = |s: Option<&CStr>| s.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: mount(2) with valid C strings or nulls.
    check(unsafe {
        libc::mount(
            ptr(source),
            target.as_ptr(),
            ptr(fstype),
            flags,
            ptr(data).cast(),
        )
    })
}

/// Create `dir` with exactly `mode` (whatever the umask); one that exists is kept.
fn mkdir(dir: &CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: mkdir(2)/chmod(2) with a valid C string.
    unsafe {
        if libc::mkdir(dir.as_ptr(), mode) != 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EEXIST) => Ok(()),
                _ => Err(e),
            };
        }
        check(libc::chmod(dir.as_ptr(), mode))
    }
}

/// A mount on a directory this system does not have is no mount, not a failure.
/// An empty, read-only directory over `dir` in this mount namespace.
fn show_empty(dir: &CStr) -> io::Result<()> {
    mount(
        Some(c"tmpfs"),
        dir,
        Some(c"tmpfs"),
        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some(c"size=4k,mode=755"),
    )
}

fn unless_missing(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether this node can isolate attempts: runs `/bin/true` through [`Isolation::enter`]
/// as `uid`/`gid` under `limits` and says why not when it cannot (no CAP_SYS_ADMIN, a kernel older
/// than 5.12, namespaces disabled).
pub fn probe(uid: u32, gid: u32, limits: &Limits, private_network: bool) -> io::Result<()> {
    let network = match private_network {
        true => Some(Networks::default().for_tenant("probe")?),
        false => None,
    };
    let dir = tempfile::Builder::new()
        .prefix("orchestrator-isolation-probe")
        .tempdir_in("/tmp")?;
    let limits = Limits {
        disk_bytes: 1 << 20,
        ..*limits
    };
    let iso = Isolation::new(dir.path(), uid, gid, &limits, network)?;
    // SAFETY: `enter` makes only async-signal-safe calls.
    unsafe { super::sandbox::probe_with(move || iso.enter()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_working_dir_under_tmp_is_made_in_the_tmpfs_and_one_elsewhere_is_bound() {
        let under =
            Isolation::new(Path::new("/tmp/w/run/t/1"), 1, 1, &Limits::default(), None).unwrap();
        let chain: Vec<&str> = under
            .work_chain
            .iter()
            .map(|c| c.to_str().unwrap())
            .collect();
        assert_eq!(
            chain,
            ["/tmp/w", "/tmp/w/run", "/tmp/w/run/t", "/tmp/w/run/t/1"]
        );
        assert!(!under.bind_home);
        assert_eq!(
            under.tmpfs_options.to_str().unwrap(),
            format!("size={DEFAULT_MAX_DISK_BYTES},nr_inodes=262144,mode=1777")
        );
        let elsewhere = Isolation::new(
            Path::new("/srv/w/run/t/1"),
            1,
            1,
            &Limits {
                disk_bytes: 4096,
                ..Limits::default()
            },
            None,
        )
        .unwrap();
        assert!(elsewhere.work_chain.is_empty() && elsewhere.bind_home);
        assert_eq!(
            elsewhere.tmpfs_options.to_str().unwrap(),
            "size=4096,nr_inodes=1024,mode=1777"
        );
        let var =
            Isolation::new(Path::new("/var/tmp/w/1"), 1, 1, &Limits::default(), None).unwrap();
        assert_eq!(var.work_chain.len(), 2, "{var:?}");
        // A path that reaches /tmp through a symlink is judged where it lands.
        let real = tempfile::tempdir_in("/tmp").unwrap();
        let links = tempfile::tempdir().unwrap();
        let link = links.path().join("work");
        std::os::unix::fs::symlink(real.path(), &link).unwrap();
        let through = Isolation::new(&link, 1, 1, &Limits::default(), None).unwrap();
        assert!(!through.bind_home, "{through:?}");
        assert_eq!(
            through.work.to_str().unwrap(),
            real.path().canonicalize().unwrap().to_str().unwrap()
        );
        // `/tmpfoo` is not under `/tmp`.
        assert!(
            Isolation::new(Path::new("/tmpfoo/1"), 1, 1, &Limits::default(), None)
                .unwrap()
                .bind_home
        );
    }

    /// Run `script` isolated as nobody in `network`; its exit status and output.
    fn isolated(script: &str, network: &Arc<OwnedFd>) -> (std::process::ExitStatus, String) {
        let dir = tempfile::tempdir().unwrap();
        isolated_in(&dir, script, network, Limits::default(), Limits::default())
    }

    /// Run `script` isolated as nobody in `dir`, under `limits` and, in the shell,
    /// `rlimits`.
    fn isolated_in(
        dir: &tempfile::TempDir,
        script: &str,
        network: &Arc<OwnedFd>,
        limits: Limits,
        rlimits: Limits,
    ) -> (std::process::ExitStatus, String) {
        use std::os::unix::process::CommandExt;
        let limits = Limits {
            disk_bytes: 1 << 20,
            ..limits
        };
        let iso = Isolation::new(dir.path(), 65534, 65534, &limits, Some(network.clone())).unwrap();
        let mut c = std::process::Command::new("/bin/sh");
        c.arg("-c").arg(script);
        let filter = super::super::syscall_filter::get().unwrap();
        // SAFETY: async-signal-safe calls only.
        unsafe {
            c.pre_exec(move || {
                iso.enter()?;
                super::super::sandbox::in_child(rlimits, Some((65534, 65534)), Some(filter))
            });
        }
        let out = c.output().unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    #[test]
    fn the_node_sees_the_shell_s_own_status_and_output() {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            println!("skipped: namespaces and the user switch need root");
            return;
        }
        let networks = Networks::default();
        let net = networks.for_tenant("a").unwrap();
        let (status, out) = isolated("echo pid=$$ uid=$(id -u); exit 3", &net);
        assert_eq!(status.code(), Some(3), "{out}");
        assert_eq!(out.trim(), "pid=2 uid=65534");
        assert_eq!(
            reaper_of(
                ["x", "__isolation-reaper", "42"]
                    .map(std::ffi::OsString::from)
                    .into_iter()
            ),
            Some(42)
        );
        assert_eq!(
            reaper_of(["x", "server"].map(std::ffi::OsString::from).into_iter()),
            None
        );
        // The shell is not its namespace's init: a signal it sends itself kills it.
        let (status, out) = isolated("kill -TERM $$; echo survived", &net);
        assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{out}");
        assert!(!out.contains("survived"), "{out}");
        // What it leaves running dies with it: the node's wait does not hang on a
        // background process that holds the output pipe.
        let started = std::time::Instant::now();
        let (status, _) = isolated("sleep 30 & exit 0", &net);
        assert!(status.success());
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        // One network namespace per tenant, made once, with its loopback up, and none
        // of the node's interfaces.
        assert!(Arc::ptr_eq(&net, &networks.for_tenant("a").unwrap()));
        let other = networks.for_tenant("b").unwrap();
        assert!(!Arc::ptr_eq(&net, &other));
        let (_, out) = isolated("cat /proc/net/dev; cat /sys/class/net/lo/operstate", &other);
        let interfaces: Vec<&str> = out
            .lines()
            .filter_map(|l| l.split_once(':').map(|(name, _)| name.trim()))
            .collect();
        assert_eq!(interfaces, ["lo"], "{out}");
        // Nor the node's /sys: its interfaces, or the cgroup tree of every attempt.
        let (_, out) = isolated("ls /sys/class/net; ls -A /sys/fs/cgroup | wc -l", &other);
        assert_eq!(out, "lo\n0\n");
        // A working dir outside /tmp (the default, beside the data dir) is bound from
        // the attempt's tmpfs: writable, private, and nothing reaches the node's disk.
        let outside = tempfile::tempdir_in("/var/lib").unwrap();
        let (status, out) = isolated_in(
            &outside,
            "echo x > f && pwd && ls -A /run | wc -l && touch /var/lib/x 2>&1",
            &net,
            Limits::default(),
            Limits::default(),
        );
        assert!(status.code() == Some(1), "{out}");
        assert!(
            out.starts_with(&format!("{}\n0\n", outside.path().display())),
            "{out}"
        );
        assert!(out.contains("Read-only file system"), "{out}");
        assert!(!outside.path().join("f").exists());
    }

    #[test]
    fn an_attempt_s_processes_are_bounded_in_its_own_pid_namespace() {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 || !per_namespace_pid_max() {
            println!("skipped: needs root and Linux 6.14 or later");
            return;
        }
        let net = Networks::default().for_tenant("a").unwrap();
        let limits = Limits {
            processes: Some(310),
            ..Limits::default()
        };
        // Only the namespace bounds it here (RLIMIT_NPROC left alone). The script first
        // runs `churn` short-lived processes, then a subshell starts sleeps until a fork
        // fails; the shell reads the count with builtins (it could not fork a `cat`).
        let processes_after = |churn: u32| {
            let script = format!(
                "i=0; while [ $i -lt {churn} ]; do /bin/true; i=$((i+1)); done; \
                 (i=0; while [ $i -lt 1000 ]; do sleep 30 & i=$((i+1)); echo $i > n; done) \
                 2>/dev/null; read n < n; echo started=$n"
            );
            let rlimits = Limits {
                processes: Some(0),
                ..limits
            };
            let dir = tempfile::tempdir().unwrap();
            let (_, out) = isolated_in(&dir, &script, &net, limits, rlimits);
            let started: u64 = out
                .trim()
                .strip_prefix("started=")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{out}"));
            // The attempt's processes: its shell, the subshell and the sleeps.
            started + 2
        };
        // Fresh, PIDs 2-299 are free as well: at most 310 + 298.
        assert_eq!(processes_after(0), 608);
        // After 400 processes the counter has passed 300: still at least 310.
        let churned = processes_after(400);
        assert!((310..=608).contains(&churned), "{churned}");
    }

    #[test]
    fn only_directories_that_do_not_hold_the_working_dir_are_hidden() {
        let host = tempfile::tempdir().unwrap();
        let kept = host.path().join("kept");
        let work = kept.join("work");
        std::fs::create_dir_all(&work).unwrap();
        let hidden = host.path().join("hidden");
        std::fs::create_dir(&hidden).unwrap();
        let link = host.path().join("link");
        std::os::unix::fs::symlink(&hidden, &link).unwrap();
        let iso = Isolation::new(&work, 1, 1, &Limits::default(), None)
            .unwrap()
            .hiding(&[
                kept.clone(),
                hidden.clone(),
                link,
                host.path().join("missing"),
                "relative".into(),
            ])
            .unwrap();
        let names: Vec<&str> = iso.hidden.iter().map(|c| c.to_str().unwrap()).collect();
        let hidden = std::fs::canonicalize(&hidden).unwrap();
        assert_eq!(names, [hidden.to_str().unwrap()]);
    }

    #[test]
    fn a_pid_max_is_set_only_where_the_kernel_keeps_one_per_namespace_and_takes_it() {
        let value = |p, per_ns| {
            pid_max_for(p, per_ns)
                .unwrap()
                .map(|c| c.into_string().unwrap())
        };
        assert_eq!(value(1024, true).as_deref(), Some("1324"));
        assert_eq!(value(1, true).as_deref(), Some("301"));
        assert_eq!(value(4_194_004, true).as_deref(), Some("4194304"));
        assert_eq!(value(4_194_005, true), None, "above what the kernel takes");
        assert_eq!(value(0, true), None, "no limit");
        assert_eq!(value(1024, false), None, "the machine's own pid_max");
        assert_eq!(parse_release("6.18.44-fc-v1300"), Some((6, 18)));
        assert_eq!(parse_release("6.14-rc1"), Some((6, 14)));
        assert_eq!(parse_release("5.10.0-31-amd64"), Some((5, 10)));
        assert_eq!(parse_release("garbage"), None);
    }
}

//! The private view of the node a shell attempt gets when it runs as another user:
//! namespaces of its own (mount, PID, IPC, UTS, and network unless its tenant may use
//! the node's), the node's filesystem read-only and without setuid, one tmpfs of
//! `executor.shell_max_disk_bytes` for everything it may write (`/tmp`, `/var/tmp`,
//! `/dev/shm` and its working dir), and a `/proc` that shows its own processes only.
//!
//! What that buys, beyond the user switch and rlimits of [`super::sandbox`]:
//! - no network (no loopback services of the node, no peer port, no cloud metadata, no
//!   private ranges: the egress policy of `http` tasks cannot be bypassed by `curl`);
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
//! processes above the shell each close every descriptor they hold (the node hears of
//! the exec and sees output from the shell alone), wait, and end as the shell did: its
//! exit code, or for a death by signal N exit code 128 + N, as shells report it (a
//! namespace's init cannot die of a signal it sends itself).
//! All three stay in the attempt's process group and cgroup: a kill of the group kills
//! them all.

use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The scratch space an attempt may fill when none is configured: 1 GiB.
pub const DEFAULT_MAX_DISK_BYTES: u64 = 1 << 30;

/// Everything the child needs, prepared before fork (nothing is allocated after it).
#[derive(Debug)]
pub struct Isolation {
    private_network: bool,
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
    /// with at most `disk_bytes` of scratch space (0: [`DEFAULT_MAX_DISK_BYTES`]).
    pub fn new(
        work: &Path,
        uid: u32,
        gid: u32,
        disk_bytes: u64,
        private_network: bool,
    ) -> io::Result<Isolation> {
        let size = if disk_bytes == 0 {
            DEFAULT_MAX_DISK_BYTES
        } else {
            disk_bytes
        };
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
            private_network,
            tmpfs_options: CString::new(format!("size={size},mode=1777"))
                .map_err(|_| io::Error::other("tmpfs options"))?,
            bind_home: work_chain.is_empty(),
            work_chain,
            work: cstring(work)?,
            uid,
            gid,
        })
    }

    /// Enter the attempt's namespaces and mounts. Runs in the child between fork and
    /// exec, as root, before the user switch; only async-signal-safe calls. Returns in
    /// the process that goes on to exec the shell; the one in between never returns.
    pub fn enter(&self) -> io::Result<()> {
        let mut flags =
            libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
        if self.private_network {
            flags |= libc::CLONE_NEWNET;
        }
        // SAFETY: unshare(2) and fork(2) after fork: plain syscalls, one thread.
        check(unsafe { libc::unshare(flags) })?;
        fork_and_relay()?;
        // PID 1 of the attempt's namespace from here. Its parent goes only by being
        // killed with the group, which kills this process too; belt and braces:
        // SAFETY: prctl(2) with plain integer arguments.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
        self.mount_view()?;
        if self.private_network {
            loopback_up()?;
        }
        fork_and_relay()?;
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
            match mount(Some(dir), target, None, libc::MS_BIND, None) {
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                other => other?,
            }
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
        // A /proc of this PID namespace: the attempt's own processes only.
        mount(
            Some(c"proc"),
            c"/proc",
            Some(c"proc"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            None,
        )
    }
}

/// Fork; return in the child, and in the parent [`relay`] for good.
fn fork_and_relay() -> io::Result<()> {
    // SAFETY: fork(2) in a single-threaded child of the node.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(()),
        pid => relay(pid),
    }
}

/// A process above the shell: holds nothing of the node's (its copies of the output
/// pipes and of `std`'s exec-status pipe are closed), reaps whatever child it gets (as
/// PID 1, the orphans of the namespace), and when `child` ends, ends with its exit code
/// (128 + N for death by signal N).
fn relay(child: libc::pid_t) -> ! {
    // SAFETY: close_range(2), waitpid(2), signal(2), kill(2), _exit(2): plain syscalls
    // in a single-threaded child.
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

/// Bring up `lo` in the attempt's own network namespace: a task may still talk to a
/// server it starts itself.
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

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether this node can isolate attempts: runs `/bin/true` through [`Isolation::enter`]
/// as `uid`/`gid` and says why not when it cannot (no CAP_SYS_ADMIN, a kernel older
/// than 5.12, namespaces disabled).
pub fn probe(uid: u32, gid: u32, private_network: bool) -> io::Result<()> {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::Builder::new()
        .prefix("orchestrator-isolation-probe")
        .tempdir_in("/tmp")?;
    let iso = Isolation::new(dir.path(), uid, gid, 1 << 20, private_network)?;
    let mut command = std::process::Command::new("/bin/true");
    command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: `enter` makes only async-signal-safe calls.
    unsafe {
        command.pre_exec(move || iso.enter());
    }
    let status = command.status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("the probe ended with {status}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_working_dir_under_tmp_is_made_in_the_tmpfs_and_one_elsewhere_is_bound() {
        let under = Isolation::new(Path::new("/tmp/w/run/t/1"), 1, 1, 0, true).unwrap();
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
            format!("size={DEFAULT_MAX_DISK_BYTES},mode=1777")
        );
        let elsewhere = Isolation::new(Path::new("/srv/w/run/t/1"), 1, 1, 4096, false).unwrap();
        assert!(elsewhere.work_chain.is_empty() && elsewhere.bind_home);
        assert_eq!(
            elsewhere.tmpfs_options.to_str().unwrap(),
            "size=4096,mode=1777"
        );
        let var = Isolation::new(Path::new("/var/tmp/w/1"), 1, 1, 0, true).unwrap();
        assert_eq!(var.work_chain.len(), 2, "{var:?}");
        // `/tmpfoo` is not under `/tmp`.
        assert!(
            Isolation::new(Path::new("/tmpfoo/1"), 1, 1, 0, true)
                .unwrap()
                .bind_home
        );
    }

    /// Run `script` isolated as nobody; its exit status and output.
    fn isolated(script: &str) -> (std::process::ExitStatus, String) {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let iso = Isolation::new(dir.path(), 65534, 65534, 1 << 20, true).unwrap();
        let mut c = std::process::Command::new("/bin/sh");
        c.arg("-c").arg(script);
        // SAFETY: async-signal-safe calls only.
        unsafe {
            c.pre_exec(move || {
                iso.enter()?;
                super::super::sandbox::in_child(Default::default(), Some((65534, 65534)))
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
        probe(65534, 65534, true).expect("this machine can isolate");
        let (status, out) = isolated("echo pid=$$ uid=$(id -u); exit 3");
        assert_eq!(status.code(), Some(3), "{out}");
        assert_eq!(out.trim(), "pid=2 uid=65534");
        // The shell is not its namespace's init: a signal it sends itself kills it.
        let (status, out) = isolated("kill -TERM $$; echo survived");
        assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{out}");
        assert!(!out.contains("survived"), "{out}");
        // What it leaves running dies with it: the node's wait does not hang on a
        // background process that holds the output pipe.
        let started = std::time::Instant::now();
        let (status, _) = isolated("sleep 30 & exit 0");
        assert!(status.success());
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    }
}

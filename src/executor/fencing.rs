//! Fencing of attempts: an attempt may run only until its *fence deadline* — its lease,
//! as applied on the node, less `executor.fence_margin_ms` — which moves when a heartbeat
//! that renewed the lease is applied there. Two parties enforce it:
//!
//! - the executor actor ([`crate::actors`]) checks every [`AttemptFence`] and stops an
//!   attempt whose deadline has passed (it is then reported `Lost`);
//! - the **fence keeper**, a small child process of the node (`orchestrator
//!   fence-keeper`), kills the attempt's process group at the same deadline when the node
//!   cannot: while the node process is stopped or stalled (SIGSTOP, swap, a debugger)
//!   it still kills each group when its deadline passes, and when the node dies (SIGKILL,
//!   the OOM killer, a crash) it sees its pipe close and kills every group at once.
//!
//! Without the keeper, the shell tasks of a node killed with `-9` ran on while the leader
//! handed their tasks to another node (the chaos witness saw overlaps of up to 3.5 s).
//! A process of its own is the only thing that outlives the node's stop or death without
//! depending on a service manager (a container or a systemd unit kills the whole cgroup,
//! but a node started by hand has neither).
//!
//! The pipe protocol is one line per change: `set PGID AT` (kill the group at `AT`,
//! nanoseconds of CLOCK_MONOTONIC, unless set again) and `del PGID` (the group ended;
//! forget it). The deadline is absolute: a line written just before the machine froze
//! and read after the thaw keeps the deadline it was written with (a relative one was
//! counted from its reading, so it outlived the freeze). The keeper runs at a raised
//! priority where it may (as root), so that after a thaw on a busy machine it runs before
//! the attempts it is to kill. It ignores SIGINT, SIGTERM, SIGHUP, SIGQUIT and the
//! terminal stop signals, and runs in its own process group: it ends when its pipe
//! closes.
//!
//! What it cannot cover: a whole machine (or container) frozen together with the keeper —
//! tasks then resume with it, and the keeper kills them on waking, within milliseconds;
//! and `http` attempts, which run inside the node (the actor cancels them).

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::warn;

use super::cgroup::Cgroups;
use super::kill_group;

/// Deadline moves smaller than this are not sent to the keeper (they are clock noise).
const KEEPER_STEP: Duration = Duration::from_millis(50);

/// The keeper's nice value where it may raise its priority.
const KEEPER_NICE: libc::c_int = -10;

/// The hidden subcommand that runs the keeper.
pub const KEEPER_SUBCOMMAND: &str = "fence-keeper";

/// The keeper's table: process group → the instant it must be dead by.
#[derive(Debug, Default)]
pub struct Keeper {
    deadlines: HashMap<i32, Instant>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("fence keeper: bad line {0:?} (want `set PGID MS` or `del PGID`)")]
pub struct BadLine(String);

impl Keeper {
    /// Apply one protocol line received at `now`, which is `now_ns` on the protocol's
    /// clock ([`mono_ns`]).
    pub fn apply(&mut self, line: &str, now: Instant, now_ns: u64) -> Result<(), BadLine> {
        let bad = || BadLine(line.to_string());
        let mut parts = line.split_ascii_whitespace();
        let verb = parts.next().ok_or_else(bad)?;
        let pgid: i32 = parts
            .next()
            .and_then(|p| p.parse().ok())
            .filter(|p| *p > 0)
            .ok_or_else(bad)?;
        match (verb, parts.next(), parts.next()) {
            ("set", Some(at), None) => {
                let at: u64 = at.parse().map_err(|_| bad())?;
                // Passed already (written before a freeze, read after it): due now.
                let left = Duration::from_nanos(at.saturating_sub(now_ns));
                self.deadlines.insert(pgid, now + left);
            }
            ("del", None, None) => {
                self.deadlines.remove(&pgid);
            }
            _ => return Err(bad()),
        }
        Ok(())
    }

    /// The groups whose deadline is at or before `now`, forgotten as they are returned.
    pub fn due(&mut self, now: Instant) -> Vec<i32> {
        let due: Vec<i32> = self
            .deadlines
            .iter()
            .filter(|(_, d)| **d <= now)
            .map(|(p, _)| *p)
            .collect();
        for p in &due {
            self.deadlines.remove(p);
        }
        due
    }

    /// The earliest deadline still pending.
    pub fn next(&self) -> Option<Instant> {
        self.deadlines.values().min().copied()
    }

    /// Every group still pending (the node is gone: all of them must die).
    pub fn drain(&mut self) -> Vec<i32> {
        self.deadlines.drain().map(|(p, _)| p).collect()
    }
}

/// A line on the keeper's stderr (the node's log), after the kill it reports, stamped
/// like the node's own lines: a closed stderr must never stop the keeper (`eprintln!`
/// would panic on it).
fn say(what: &str) {
    let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let _ = writeln!(std::io::stderr(), "{at} fence keeper: {what}");
}

/// The protocol's clock: CLOCK_MONOTONIC in nanoseconds, one clock for the node and its
/// keeper (one machine). By hand: `Instant` reads the same clock but cannot be written on
/// a line.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// `deadline` on the protocol's clock.
fn stamp_of(deadline: Instant) -> u64 {
    let (now, now_ns) = (Instant::now(), mono_ns());
    match deadline.checked_duration_since(now) {
        Some(left) => now_ns.saturating_add(left.as_nanos() as u64),
        None => now_ns.saturating_sub(now.duration_since(deadline).as_nanos() as u64),
    }
}

/// The keeper process's main loop: read the protocol from stdin, kill groups (and their
/// attempts' cgroups under `cgroups`) at their deadlines, kill all of them when stdin
/// closes. Returns the process exit code.
pub fn serve_stdin(cgroups: Option<Cgroups>) -> i32 {
    // Not stopped or ended by what is sent to the node's terminal or process group:
    // a keeper stopped together with its node would fence nothing.
    for sig in [
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGTSTP,
        libc::SIGTTIN,
        libc::SIGTTOU,
    ] {
        // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
        unsafe {
            libc::signal(sig, libc::SIG_IGN);
        }
    }
    // A thread reads lines so the main loop can wait for "a line or the next deadline".
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(l) = line else { return };
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    // Ahead of the attempts after a thaw on a busy machine (it sleeps otherwise). Only
    // root may raise it; elsewhere it stays at the node's priority.
    // SAFETY: setpriority(2) on this process has no memory effects.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, KEEPER_NICE);
    }
    let mut keeper = Keeper::default();
    loop {
        let wait = keeper.next().map_or(Duration::from_secs(3600), |d| {
            d.saturating_duration_since(Instant::now())
        });
        match rx.recv_timeout(wait) {
            Ok(line) => {
                if let Err(e) = keeper.apply(&line, Instant::now(), mono_ns()) {
                    say(&e.to_string());
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let left = keeper.drain();
                for p in &left {
                    kill_group(*p, cgroups.as_ref());
                }
                if !left.is_empty() {
                    say(&format!(
                        "the node is gone; killed the process groups of its {} attempts",
                        left.len()
                    ));
                }
                if let Some(c) = &cgroups {
                    c.remove_all();
                }
                return 0;
            }
        }
        for p in keeper.due(Instant::now()) {
            kill_group(p, cgroups.as_ref());
            say(&format!(
                "killed process group {p}: its lease was not renewed in time"
            ));
        }
    }
}

/// The node's end of the pipe to its keeper. It remembers what it handed the keeper, so
/// a keeper that died (killed by someone, OOM), or stopped reading until its pipe filled,
/// is replaced and told it all again: at the next message to it, or at the executor's
/// next fence check, whichever comes first.
pub struct KeeperLink {
    inner: Mutex<Link>,
}

/// The node's side of its keeper: the pipe, the process, and what the keeper holds.
struct Link {
    /// Whether this node runs a keeper at all (not for `none()`).
    wanted: bool,
    cgroup_parent: Option<std::path::PathBuf>,
    stdin: Option<ChildStdin>,
    child: Option<Child>,
    /// Every process group the keeper holds, with its deadline.
    groups: HashMap<i32, Instant>,
    /// When a keeper was last started: a replacement waits a second after it, so a keeper
    /// that cannot live is not restarted in a loop.
    started: Option<Instant>,
    /// A start failed (said once).
    failed: bool,
    /// A write to the keeper failed: it exited, or stopped reading until its pipe filled.
    broken: bool,
}

impl Link {
    fn new(wanted: bool, cgroup_parent: Option<std::path::PathBuf>) -> Link {
        Link {
            wanted,
            cgroup_parent,
            stdin: None,
            child: None,
            groups: HashMap::new(),
            started: None,
            failed: false,
            broken: false,
        }
    }

    fn start(&mut self) {
        use std::os::unix::process::CommandExt;
        self.started = Some(Instant::now());
        let mut command = Command::new("/proc/self/exe");
        command.arg(KEEPER_SUBCOMMAND);
        if let Some(p) = &self.cgroup_parent {
            command.arg("--cgroup-parent").arg(p);
        }
        // Its own process group: a signal to the node's group (`kill -STOP -PGID`, a
        // terminal's Ctrl-Z) does not reach it.
        let started = command
            .process_group(0)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn();
        match started {
            Ok(mut child) => {
                self.stdin = child.stdin.take();
                if let Some(pipe) = &self.stdin {
                    // A keeper that is alive but not reading (stopped, wedged) must not
                    // block the executor once the pipe is full: a write that would block
                    // fails instead, and the keeper is replaced.
                    use std::os::fd::AsRawFd;
                    let fd = pipe.as_raw_fd();
                    // SAFETY: F_GETFL/F_SETFL only read and set the pipe's status flags.
                    unsafe {
                        let flags = libc::fcntl(fd, libc::F_GETFL);
                        if flags >= 0 {
                            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
                        }
                    }
                }
                self.child = Some(child);
            }
            Err(e) => {
                if !self.failed {
                    warn!(error = %e, "cannot start the fence keeper: attempts of this node will not be stopped if the node process is killed or stopped");
                }
                self.failed = true;
            }
        }
    }

    /// Whether the keeper is gone (its pipe broke, or it exited).
    fn gone(&mut self) -> bool {
        self.broken
            || self.stdin.is_none()
            || self
                .child
                .as_mut()
                .is_none_or(|c| !matches!(c.try_wait(), Ok(None)))
    }

    /// Start a new keeper in place of a gone one and hand it every group it must hold.
    fn replace(&mut self) {
        if !self.wanted
            || self
                .started
                .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        if let Some(mut old) = self.child.take() {
            // Killed before its pipe closes (a keeper that sees its pipe close kills every
            // attempt), and reaped: no zombie is left behind.
            let _ = old.kill();
            let _ = old.wait();
        }
        self.stdin = None;
        self.broken = false;
        self.start();
        let lines: Vec<String> = self.groups.iter().map(|(p, d)| set_line(*p, *d)).collect();
        for line in &lines {
            if !self.write(line) {
                return;
            }
        }
        if self.stdin.is_some() {
            warn!(
                attempts = lines.len(),
                "the fence keeper was gone: started a new one and handed it this node's attempts"
            );
        }
    }

    fn write(&mut self, line: &str) -> bool {
        let Some(pipe) = self.stdin.as_mut() else {
            return false;
        };
        // One short line is far below PIPE_BUF: the write is atomic (all or nothing on a
        // non-blocking pipe). A full pipe (the keeper stopped reading) or a broken one
        // (it exited) means this keeper holds nothing any more.
        if pipe.write_all(line.as_bytes()).is_ok() {
            return true;
        }
        // The pipe stays open until the keeper is killed: a keeper that sees it close
        // takes the node for dead and kills every attempt.
        self.broken = true;
        false
    }

    /// Tell the keeper `line`, replacing it first if it is gone.
    fn send(&mut self, line: &str) {
        if !self.write(line) && self.wanted {
            // `groups` already says what this line said: the replacement is told it.
            self.replace();
        }
    }
}

fn set_line(pgid: i32, deadline: Instant) -> String {
    format!("set {pgid} {}\n", stamp_of(deadline))
}

impl KeeperLink {
    /// Start this node's keeper (the running binary, `fence-keeper`). When it cannot be
    /// started the node still fences attempts itself, and says so.
    pub fn spawn(cgroups: Option<&Cgroups>) -> KeeperLink {
        let mut k = Link::new(true, cgroups.map(|c| c.parent().to_path_buf()));
        k.start();
        KeeperLink {
            inner: Mutex::new(k),
        }
    }

    /// A link to no keeper (unit tests).
    pub fn none() -> KeeperLink {
        KeeperLink {
            inner: Mutex::new(Link::new(false, None)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Link> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replace the keeper if it is gone (the executor calls this with every fence check).
    pub fn check(&self) {
        let mut k = self.lock();
        if k.wanted && k.gone() {
            k.replace();
        }
    }

    fn set(&self, pgid: i32, deadline: Instant) {
        let mut k = self.lock();
        k.groups.insert(pgid, deadline);
        k.send(&set_line(pgid, deadline));
    }

    fn del(&self, pgid: i32) {
        let mut k = self.lock();
        k.groups.remove(&pgid);
        k.send(&format!("del {pgid}\n"));
    }
}

/// One attempt's fence: its deadline, its process group once it has one, and whether
/// the executor has stopped it for want of renewal.
#[derive(Debug)]
pub struct AttemptFence {
    state: Mutex<FenceState>,
    fenced: AtomicBool,
}

#[derive(Debug)]
struct FenceState {
    deadline: Instant,
    /// The applied lease (cluster-clock ms) the deadline was last taken from.
    lease_until: i64,
    pgid: Option<i32>,
    /// The deadline the keeper last heard for `pgid`.
    told: Option<Instant>,
}

impl AttemptFence {
    pub fn new(deadline: Instant, lease_until: i64) -> AttemptFence {
        AttemptFence {
            state: Mutex::new(FenceState {
                deadline,
                lease_until,
                pgid: None,
                told: None,
            }),
            fenced: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FenceState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn deadline(&self) -> Instant {
        self.lock().deadline
    }

    /// The applied lease is now `lease_until`; `target` is the deadline the cluster clock
    /// gives it (None: the clock is not calibrated, keep the deadline). The deadline
    /// moves later only by what the lease itself grew — a clock stepped back cannot
    /// extend it — and earlier whenever the clock says so. A deadline once passed stays
    /// passed. Returns false when the attempt must stop. The keeper hears of a move of
    /// 50 ms or more.
    pub fn observe(&self, lease_until: i64, target: Option<Instant>, keeper: &KeeperLink) -> bool {
        let now = Instant::now();
        let mut s = self.lock();
        if now >= s.deadline {
            return false;
        }
        let grown = Duration::from_millis(lease_until.saturating_sub(s.lease_until).max(0) as u64);
        s.lease_until = s.lease_until.max(lease_until);
        let Some(target) = target else {
            return true;
        };
        let cap = s.deadline.checked_add(grown).unwrap_or(s.deadline);
        let new = target.min(cap);
        s.deadline = new;
        if let (Some(p), Some(told)) = (s.pgid, s.told) {
            let moved = if new > told { new - told } else { told - new };
            if moved >= KEEPER_STEP {
                keeper.set(p, new);
                s.told = Some(new);
            }
        }
        now < new
    }

    /// The attempt's process group exists: hand it to the keeper.
    pub fn spawned(&self, pgid: i32, keeper: &KeeperLink) {
        let mut s = self.lock();
        s.pgid = Some(pgid);
        s.told = Some(s.deadline);
        keeper.set(pgid, s.deadline);
    }

    /// The attempt's process group has ended: the keeper forgets it.
    pub fn exited(&self, keeper: &KeeperLink) {
        if let Some(p) = self.lock().pgid.take() {
            keeper.del(p);
        }
    }

    /// Stopped by the executor because its lease could not be renewed.
    pub fn fence(&self) {
        self.fenced.store(true, Ordering::Release);
    }

    /// Fenced, or past its deadline: the attempt must not run (and is reported lost).
    pub fn expired(&self) -> bool {
        self.fenced.load(Ordering::Acquire) || Instant::now() >= self.deadline()
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A point of the protocol's clock for the tests, and `set` lines against it.
    const NS0: u64 = 1_000_000_000_000;
    fn ms(n: u64) -> u64 {
        n * 1_000_000
    }
    fn set(pgid: i32, at_ms: u64) -> String {
        format!("set {pgid} {}", NS0 + ms(at_ms))
    }

    #[test]
    fn groups_are_due_at_their_deadline_and_a_set_moves_it() {
        let t0 = Instant::now();
        let mut k = Keeper::default();
        k.apply(&set(100, 1000), t0, NS0).unwrap();
        k.apply(&set(200, 3000), t0, NS0).unwrap();
        assert_eq!(k.next(), Some(t0 + Duration::from_millis(1000)));
        assert!(k.due(t0 + Duration::from_millis(999)).is_empty());
        // Renewed before it ran out: not due at its old deadline.
        let t900 = t0 + Duration::from_millis(900);
        k.apply(&set(100, 3400), t900, NS0 + ms(900)).unwrap();
        assert!(k.due(t0 + Duration::from_millis(1500)).is_empty());
        assert_eq!(k.due(t0 + Duration::from_millis(3100)), vec![200]);
        assert_eq!(k.next(), Some(t0 + Duration::from_millis(3400)));
        assert_eq!(k.due(t0 + Duration::from_millis(3400)), vec![100]);
        assert_eq!(k.due(t0 + Duration::from_millis(3400)), Vec::<i32>::new());
        k.apply(&set(300, 10), t0, NS0).unwrap();
        assert_eq!(k.drain(), vec![300]);
        assert_eq!(k.next(), None);
    }

    #[test]
    fn a_line_read_after_a_freeze_keeps_the_deadline_it_was_written_with() {
        // Written with 100 ms left; the machine froze for 5 s before the keeper read it.
        let thawed = Instant::now();
        let mut k = Keeper::default();
        k.apply(&set(9, 100), thawed, NS0 + ms(5000)).unwrap();
        assert_eq!(
            k.due(thawed),
            vec![9],
            "due at the thaw, not 100 ms after it"
        );
    }

    #[test]
    fn stamps_and_the_keepers_reading_agree_on_one_clock() {
        let deadline = Instant::now() + Duration::from_millis(700);
        let line = set_line(5, deadline);
        let mut k = Keeper::default();
        k.apply(line.trim(), Instant::now(), mono_ns()).unwrap();
        let read = k.next().expect("held");
        let skew = if read > deadline {
            read - deadline
        } else {
            deadline - read
        };
        assert!(skew < Duration::from_millis(5), "{skew:?}");
    }

    #[test]
    fn a_deleted_group_is_never_killed() {
        let t0 = Instant::now();
        let mut k = Keeper::default();
        k.apply(&set(7, 10), t0, NS0).unwrap();
        k.apply("del 7", t0, NS0).unwrap();
        assert!(k.due(t0 + Duration::from_secs(60)).is_empty());
        assert!(k.drain().is_empty());
    }

    #[test]
    fn bad_lines_are_refused_and_change_nothing() {
        let t0 = Instant::now();
        let mut k = Keeper::default();
        for line in [
            "",
            "set",
            "set 5",
            "set x 10",
            "set 0 10",
            "set -1 10",
            "set 5 -3",
            "del",
            "del 5 6",
            "kill 5",
        ] {
            assert!(k.apply(line, t0, NS0).is_err(), "{line:?} accepted");
        }
        assert_eq!(k.next(), None);
    }

    #[test]
    fn a_fence_grows_only_with_its_lease_and_a_passed_deadline_stays_passed() {
        let t0 = Instant::now();
        let none = KeeperLink::none();
        let f = AttemptFence::new(t0 + Duration::from_secs(5), 10_000);
        // The lease grew by 1 s but the clock says 9 s: a clock stepped back moves the
        // deadline by what the lease grew, no more.
        assert!(f.observe(11_000, Some(t0 + Duration::from_secs(9)), &none));
        assert_eq!(f.deadline(), t0 + Duration::from_secs(6));
        // Uncalibrated: kept where it is, the lease remembered.
        assert!(f.observe(12_000, None, &none));
        assert_eq!(f.deadline(), t0 + Duration::from_secs(6));
        // The clock says earlier: earlier.
        assert!(f.observe(12_000, Some(t0 + Duration::from_secs(4)), &none));
        assert_eq!(f.deadline(), t0 + Duration::from_secs(4));
        // Past: must stop, and a later renewal does not revive it.
        assert!(!f.observe(12_000, Some(t0), &none));
        assert!(f.expired());
        assert!(!f.observe(60_000, Some(t0 + Duration::from_secs(60)), &none));
        let fenced = AttemptFence::new(t0 + Duration::from_secs(60), 0);
        fenced.fence();
        assert!(fenced.expired() && fenced.is_fenced());
    }
}

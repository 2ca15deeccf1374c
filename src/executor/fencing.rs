//! Fencing of attempts: an attempt may run only until its *fence deadline* — its lease,
//! as applied on the node, less `executor.fence_margin_ms` — which moves when a heartbeat
//! that renewed the lease is applied there. Two parties enforce it:
//!
//! - the executor actor ([`crate::actors`]) checks every [`AttemptFence`] and stops an
//!   attempt whose deadline has passed (it is then reported `Lost`);
//! - the **fence keeper**, a small child process of the node (`orchestrator
//!   fence-keeper`), kills the attempt's process group at the same deadline when the node
//!   cannot: while the node process is stopped or stalled (SIGSTOP, a frozen VM, swap)
//!   it still kills each group when its deadline passes, and when the node dies (SIGKILL,
//!   the OOM killer, a crash) it sees its pipe close and kills every group at once.
//!
//! Without the keeper, the shell tasks of a node killed with `-9` ran on while the leader
//! handed their tasks to another node (the chaos witness saw overlaps of up to 3.5 s).
//! A process of its own is the only thing that outlives the node's stop or death without
//! depending on a service manager (a container or a systemd unit kills the whole cgroup,
//! but a node started by hand has neither).
//!
//! The pipe protocol is one line per change: `set PGID MS` (kill the group `MS` ms from
//! now unless set again) and `del PGID` (the group ended; forget it). The keeper ignores
//! SIGINT, SIGTERM, SIGHUP and SIGQUIT: it ends when its pipe closes.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::warn;

use super::kill_group;

/// Deadline moves smaller than this are not sent to the keeper (they are clock noise).
const KEEPER_STEP: Duration = Duration::from_millis(50);

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
    /// Apply one protocol line received at `now`.
    pub fn apply(&mut self, line: &str, now: Instant) -> Result<(), BadLine> {
        let bad = || BadLine(line.to_string());
        let mut parts = line.split_ascii_whitespace();
        let verb = parts.next().ok_or_else(bad)?;
        let pgid: i32 = parts
            .next()
            .and_then(|p| p.parse().ok())
            .filter(|p| *p > 0)
            .ok_or_else(bad)?;
        match (verb, parts.next(), parts.next()) {
            ("set", Some(ms), None) => {
                let ms: u64 = ms.parse().map_err(|_| bad())?;
                self.deadlines.insert(pgid, now + Duration::from_millis(ms));
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

/// The keeper process's main loop: read the protocol from stdin, kill groups at their
/// deadlines, kill all of them when stdin closes. Returns the process exit code.
pub fn serve_stdin() -> i32 {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
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
    let mut keeper = Keeper::default();
    loop {
        let wait = keeper.next().map_or(Duration::from_secs(3600), |d| {
            d.saturating_duration_since(Instant::now())
        });
        match rx.recv_timeout(wait) {
            Ok(line) => {
                if let Err(e) = keeper.apply(&line, Instant::now()) {
                    eprintln!("{e}");
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let left = keeper.drain();
                if !left.is_empty() {
                    eprintln!(
                        "fence keeper: the node is gone; killing the process groups of its {} attempts",
                        left.len()
                    );
                }
                for p in left {
                    kill_group(p);
                }
                return 0;
            }
        }
        for p in keeper.due(Instant::now()) {
            eprintln!("fence keeper: killing process group {p}: its lease was not renewed in time");
            kill_group(p);
        }
    }
}

/// The node's end of the pipe to its keeper.
pub struct KeeperLink {
    stdin: Mutex<Option<ChildStdin>>,
    // Kept so the keeper is not reaped by anyone else; it exits when `stdin` closes.
    _child: Option<Child>,
}

impl KeeperLink {
    /// Start this node's keeper (the running binary, `fence-keeper`). When it cannot be
    /// started the node still fences attempts itself, and says so.
    pub fn spawn() -> KeeperLink {
        let started = Command::new("/proc/self/exe")
            .arg(KEEPER_SUBCOMMAND)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn();
        match started {
            Ok(mut child) => KeeperLink {
                stdin: Mutex::new(child.stdin.take()),
                _child: Some(child),
            },
            Err(e) => {
                warn!(error = %e, "cannot start the fence keeper: attempts of this node will not be stopped if the node process is killed or stopped");
                KeeperLink::none()
            }
        }
    }

    /// A link to no keeper (unit tests; a node that could not start one).
    pub fn none() -> KeeperLink {
        KeeperLink {
            stdin: Mutex::new(None),
            _child: None,
        }
    }

    fn send(&self, line: String) {
        let mut guard = self.stdin.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pipe) = guard.as_mut() {
            // One short line is far below PIPE_BUF: the write is atomic and does not
            // block while the keeper keeps reading.
            if let Err(e) = pipe.write_all(line.as_bytes()) {
                warn!(error = %e, "the fence keeper is gone: attempts of this node will not be stopped if the node process is killed or stopped");
                *guard = None;
            }
        }
    }

    fn set(&self, pgid: i32, deadline: Instant) {
        let ms = deadline
            .saturating_duration_since(Instant::now())
            .as_millis();
        self.send(format!("set {pgid} {ms}\n"));
    }

    fn del(&self, pgid: i32) {
        self.send(format!("del {pgid}\n"));
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
    pgid: Option<i32>,
}

impl AttemptFence {
    pub fn new(deadline: Instant) -> AttemptFence {
        AttemptFence {
            state: Mutex::new(FenceState {
                deadline,
                pgid: None,
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

    /// The attempt may run until `until` (its applied lease, less the margin, moved by
    /// renewals or by a corrected clock). The keeper hears of a change of 50 ms or more.
    pub fn set_deadline(&self, until: Instant, keeper: &KeeperLink) {
        let mut s = self.lock();
        let moved = if until > s.deadline {
            until - s.deadline
        } else {
            s.deadline - until
        };
        s.deadline = until;
        if let (Some(p), true) = (s.pgid, moved >= KEEPER_STEP) {
            keeper.set(p, until);
        }
    }

    /// The attempt's process group exists: hand it to the keeper.
    pub fn spawned(&self, pgid: i32, keeper: &KeeperLink) {
        let mut s = self.lock();
        s.pgid = Some(pgid);
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

    #[test]
    fn groups_are_due_at_their_deadline_and_a_set_moves_it() {
        let t0 = Instant::now();
        let mut k = Keeper::default();
        k.apply("set 100 1000", t0).unwrap();
        k.apply("set 200 3000", t0).unwrap();
        assert_eq!(k.next(), Some(t0 + Duration::from_millis(1000)));
        assert!(k.due(t0 + Duration::from_millis(999)).is_empty());
        // Renewed before it ran out: not due at its old deadline.
        k.apply("set 100 2500", t0 + Duration::from_millis(900))
            .unwrap();
        assert!(k.due(t0 + Duration::from_millis(1500)).is_empty());
        assert_eq!(k.due(t0 + Duration::from_millis(3100)), vec![200]);
        assert_eq!(k.next(), Some(t0 + Duration::from_millis(3400)));
        assert_eq!(k.due(t0 + Duration::from_millis(3400)), vec![100]);
        assert_eq!(k.due(t0 + Duration::from_millis(3400)), Vec::<i32>::new());
        k.apply("set 300 10", t0).unwrap();
        assert_eq!(k.drain(), vec![300]);
        assert_eq!(k.next(), None);
    }

    #[test]
    fn a_deleted_group_is_never_killed() {
        let t0 = Instant::now();
        let mut k = Keeper::default();
        k.apply("set 7 10", t0).unwrap();
        k.apply("del 7", t0).unwrap();
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
            assert!(k.apply(line, t0).is_err(), "{line:?} accepted");
        }
        assert_eq!(k.next(), None);
    }

    #[test]
    fn a_fence_follows_its_deadline_and_expires_at_it() {
        let t0 = Instant::now();
        let f = AttemptFence::new(t0 + Duration::from_secs(5));
        let none = KeeperLink::none();
        f.set_deadline(t0 + Duration::from_secs(8), &none);
        assert_eq!(f.deadline(), t0 + Duration::from_secs(8));
        assert!(!f.expired());
        f.set_deadline(t0, &none);
        assert!(f.expired(), "a deadline already passed");
        let fenced = AttemptFence::new(t0 + Duration::from_secs(60));
        fenced.fence();
        assert!(fenced.expired() && fenced.is_fenced());
    }
}

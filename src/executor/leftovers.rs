//! The process groups a crashed node leaves running, and how its next run finds and kills
//! them without killing anyone else's.
//!
//! While an attempt runs, `<data dir>/executor/pgids/<PGID>` records its process group:
//! the machine's boot id and the group leader's start time (`/proc/PID/stat` field 22,
//! clock ticks since boot). A restarted node kills a recorded group only when the record
//! still names it. A pgid is only a number: the keeper kills a dead node's groups at once,
//! so by the time the node restarts (minutes or days later, or after a reboot) the number
//! may belong to another process group entirely, such as another node's attempt on the
//! same host, or a system service. So a group is killed when:
//! - the boot id is the same (after a reboot nothing of ours runs), and
//! - its leader is the recorded process (same start time), or no process has the pid at
//!   all: Linux keeps a pid number allocated while any process still uses it as its
//!   process group id, so members left in a group whose leader exited are ours.
//!
//! A record without both facts (written before records had them, or unreadable) is not
//! trusted: the keeper already killed those groups when the node died.
//!
//! What this cannot tell apart: a leader-less group that is not ours, because the pid was
//! reused by a process that became a group leader and then exited while its own group
//! lived on, all before the restart. It needs the pid to come round to the exact number,
//! and that process to do both things; no test here makes it happen.

use std::path::{Path, PathBuf};

use tracing::{info, warn};

use super::cgroup::Cgroups;

/// This machine's boot id (new at every boot).
fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The process that holds a pid now, as `/proc` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    /// No process has the pid.
    Absent,
    /// A process started at this many clock ticks after boot has it.
    StartedAt(u64),
    /// `/proc` would not say (no permission, an unexpected format). Under `hidepid=2` a
    /// hidden process reads as absent instead, but then its group was never recorded:
    /// recording needs the leader's start time.
    Unknown,
}

/// Who holds `pid` now. Only "no such file" means no process: any other failure to read
/// is [`Holder::Unknown`], which kills nothing.
fn holder(pid: i32) -> Holder {
    let stat = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Holder::Absent,
        Err(_) => return Holder::Unknown,
    };
    // Field 2 (the command) is in parentheses and may hold spaces or ')': count fields
    // after its last ')'. Field 3 comes first there, so field 22 is the 20th.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(19)?.parse().ok())
        .map_or(Holder::Unknown, Holder::StartedAt)
}

/// Whether a recorded group is still this node's to kill.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Its recorded leader still runs, or only members are left.
    Ours,
    /// The machine rebooted since: the group is gone.
    Rebooted,
    /// Another process holds the pid now: the group is gone.
    Reused,
    /// The record lacks the boot id or the start time, or `/proc` would not say.
    Unverifiable,
}

/// Judge `record` (its file's text) by the boot id now and who holds the pgid's number.
fn judge(record: &str, boot_now: Option<&str>, holder: Holder) -> Verdict {
    let mut parts = record.split_whitespace();
    let (Some(boot), Some(start), None) = (parts.next(), parts.next(), parts.next()) else {
        return Verdict::Unverifiable;
    };
    let Ok(start) = start.parse::<u64>() else {
        return Verdict::Unverifiable;
    };
    match (boot_now, holder) {
        (None, _) => Verdict::Unverifiable,
        (Some(now), _) if now != boot => Verdict::Rebooted,
        (Some(_), Holder::Unknown) => Verdict::Unverifiable,
        (Some(_), Holder::StartedAt(s)) if s != start => Verdict::Reused,
        (Some(_), Holder::StartedAt(_) | Holder::Absent) => Verdict::Ours,
    }
}

/// The records of a node's running process groups.
#[derive(Debug, Clone)]
pub struct GroupRecords {
    dir: PathBuf,
}

impl GroupRecords {
    pub fn new(data_dir: &Path) -> Self {
        GroupRecords {
            dir: data_dir.join("executor").join("pgids"),
        }
    }

    /// Record group `pgid`, whose leader was just spawned. The path to remove once the
    /// attempt is over; `None` when it could not be written (a crash then leaves the
    /// group to the keeper alone).
    pub fn record(&self, pgid: i32) -> Option<PathBuf> {
        let (Some(boot), Holder::StartedAt(start)) = (boot_id(), holder(pgid)) else {
            warn!(
                pgid,
                "cannot record an attempt's process group (no boot id, or /proc hides its \
                 leader): a crash of this node leaves it to the fence keeper alone"
            );
            return None;
        };
        let file = self.dir.join(pgid.to_string());
        std::fs::create_dir_all(&self.dir)
            .and_then(|_| std::fs::write(&file, format!("{boot} {start}\n")))
            .ok()
            .map(|_| file)
    }

    /// Kill what a previous run of this node left running (each group only while its
    /// record still names it) and remove every record. Returns how many were killed.
    pub fn kill_leftovers(&self, node: u64, cgroups: Option<&Cgroups>) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let boot = boot_id();
        let mut killed = 0;
        for e in entries.flatten() {
            let pgid = e
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
                .filter(|p| *p > 1);
            if let Some(pgid) = pgid {
                let record = std::fs::read_to_string(e.path()).unwrap_or_default();
                match judge(&record, boot.as_deref(), holder(pgid)) {
                    Verdict::Ours => {
                        warn!(
                            node,
                            pgid, "killing a process group left by a previous run of this node"
                        );
                        super::kill_group(pgid, cgroups);
                        killed += 1;
                    }
                    v => info!(
                        node,
                        pgid,
                        verdict = ?v,
                        "not killing a recorded process group: it is no longer this node's"
                    ),
                }
            }
            let _ = std::fs::remove_file(e.path());
        }
        killed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_is_ours_only_while_its_record_still_names_it() {
        use Holder::{Absent, StartedAt, Unknown};
        let b = Some("boot-a");
        let rec = "boot-a 1234\n";
        assert_eq!(judge(rec, b, StartedAt(1234)), Verdict::Ours);
        // The leader exited; members keep the pid number allocated.
        assert_eq!(judge(rec, b, Absent), Verdict::Ours);
        assert_eq!(judge(rec, b, StartedAt(99_999)), Verdict::Reused);
        assert_eq!(
            judge(rec, Some("boot-b"), StartedAt(1234)),
            Verdict::Rebooted
        );
        assert_eq!(judge(rec, Some("boot-b"), Absent), Verdict::Rebooted);
        // /proc would not say: nothing is killed on a guess.
        assert_eq!(judge(rec, b, Unknown), Verdict::Unverifiable);
        for unverifiable in ["", "boot-a", "boot-a x", "boot-a 1 2", "\n"] {
            assert_eq!(
                judge(unverifiable, b, Absent),
                Verdict::Unverifiable,
                "{unverifiable:?}"
            );
        }
        assert_eq!(judge("boot-a 1234", None, Absent), Verdict::Unverifiable);
    }

    #[test]
    fn start_times_are_read_from_proc_past_an_awkward_command_name() {
        let me = std::process::id() as i32;
        let Holder::StartedAt(start) = holder(me) else {
            panic!("this process has a start time")
        };
        assert_eq!(holder(me), Holder::StartedAt(start), "stable");
        // The command name (here "odd ) name (x") is the executable's file name.
        let dir = tempfile::tempdir().expect("a temp dir");
        let odd = dir.path().join("odd ) name (x");
        std::os::unix::fs::symlink("/bin/sleep", &odd).expect("a symlink");
        let mut child = std::process::Command::new(&odd)
            .arg("30")
            .spawn()
            .expect("sleep spawns");
        let pid = child.id() as i32;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(stat.contains("(odd ) name (x)"), "{stat}");
        let Holder::StartedAt(theirs) = holder(pid) else {
            panic!("the child has a start time")
        };
        assert!(theirs >= start, "a child starts after its parent");
        let _ = child.kill();
        let _ = child.wait();
        // Gone (or, on a busy machine, its pid already another process's).
        assert_ne!(
            holder(pid),
            Holder::StartedAt(theirs),
            "a reaped child is gone"
        );
        assert_eq!(holder(-5), Holder::Absent, "no such process");
        assert!(boot_id().is_some());
    }

    /// A `sleep 30` leading its own process group.
    fn group_leader() -> std::process::Child {
        use std::os::unix::process::CommandExt;
        std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .expect("sleep spawns")
    }

    #[test]
    fn a_restart_kills_its_own_leftover_groups_and_no_one_else_s() {
        let data = tempfile::tempdir().expect("a temp dir");
        let records = GroupRecords::new(data.path());
        let mut ours = group_leader();
        let mut reused = group_leader();
        let mut unrecorded = group_leader();
        assert!(records.record(ours.id() as i32).is_some());
        // The pid of a group that ended, now held by another process: its start time
        // differs from the record's. And a record that lacks the facts.
        let pid = reused.id() as i32;
        let Holder::StartedAt(now) = holder(pid) else {
            panic!("running")
        };
        let then = now - 1;
        let boot = boot_id().expect("a boot id");
        std::fs::write(
            records.dir.join(pid.to_string()),
            format!("{boot} {then}\n"),
        )
        .unwrap();
        std::fs::write(records.dir.join(unrecorded.id().to_string()), "").unwrap();

        assert_eq!(records.kill_leftovers(1, None), 1);
        let status = ours.wait().expect("wait");
        assert!(
            !status.success(),
            "our leftover group was killed: {status:?}"
        );
        assert!(
            reused.try_wait().expect("try_wait").is_none(),
            "another's group lives"
        );
        assert!(
            unrecorded.try_wait().expect("try_wait").is_none(),
            "an unverifiable one lives"
        );
        assert_eq!(
            std::fs::read_dir(&records.dir)
                .map(|d| d.count())
                .unwrap_or(0),
            0
        );
        for mut c in [reused, unrecorded] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

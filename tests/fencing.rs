//! No zombie attempts, on real processes: a shell task's whole process group dies with
//! its node when the node is SIGKILLed, and dies at its fence deadline when the node is
//! SIGSTOPped — before the leader hands the task to another node. Both are the node's
//! fence keeper at work (src/executor/fencing.rs); the node itself can do neither.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{wait_for, Cluster, ALL_SCOPES};
use reqwest::StatusCode;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(60);

/// True while some process of group `pgid` is alive (zombies do not count: a stopped
/// node cannot reap its children).
fn group_alive(pgid: i32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            return false;
        };
        // pid (comm) state ppid pgrp ...: comm may hold spaces, so split after ')'.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            return false;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        f.len() > 2 && f[2] == pgid.to_string() && !matches!(f[0], "Z" | "X" | "x")
    })
}

/// A DAG whose one shell task writes its process group id to `dir/ATTEMPT.pid`, then
/// sleeps in a child process (so only a group kill ends it).
fn sleeper(dag_id: &str, dir: &Path) -> Value {
    let cmd = format!(
        "echo $$ > {}/$ORCHESTRATOR_ATTEMPT.pid.tmp && mv {d}/$ORCHESTRATOR_ATTEMPT.pid.tmp {d}/$ORCHESTRATOR_ATTEMPT.pid; sleep 60; true",
        dir.display(),
        d = dir.display()
    );
    json!({"dag_id": dag_id, "tasks": [
        {"task_id": "s", "kind": "shell", "command": cmd, "retries": 3}]})
}

fn read_pgid(dir: &Path, attempt: u32) -> Option<i32> {
    std::fs::read_to_string(dir.join(format!("{attempt}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()
}

async fn trigger(c: &Cluster, via: u64, t: &str, dag_id: &str) -> String {
    let (s, v) = c
        .post(
            via,
            "/runs",
            t,
            &json!({"dag_id": dag_id, "run_type": "manual"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["run_id"].as_str().expect("run_id").to_string()
}

/// A single node (with `env`) running a `sleeper` task: the node, the task's dir and its
/// process group.
async fn node_running_a_sleeper(env: &[(&str, &str)]) -> (Cluster, tempfile::TempDir, i32) {
    let mut c = Cluster::new(1, env);
    c.start_all();
    c.wait_leader(LONG).await;
    c.wait_ready(LONG).await;
    let t = c.token("acme", ALL_SCOPES);
    let dir = tempfile::tempdir().expect("temp dir");
    let (s, v) = c.post(1, "/dags", &t, &sleeper("sleepy", dir.path())).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    trigger(&c, 1, &t, "sleepy").await;
    let pgid = wait_for(LONG, "the task to start", || async {
        read_pgid(dir.path(), 1)
    })
    .await;
    assert!(group_alive(pgid), "the task's group {pgid} runs");
    (c, dir, pgid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_node_takes_its_tasks_with_it() {
    let (mut c, _dir, pgid) = node_running_a_sleeper(&[]).await;

    c.kill(1);
    let killed = Instant::now();
    let gone = wait_for(
        Duration::from_secs(5),
        "the task's process group to die with its node",
        || async { (!group_alive(pgid)).then(|| killed.elapsed()) },
    )
    .await;
    println!("node SIGKILLed: its task's process group was gone after {gone:?}");
}

/// The pid of node `node_pid`'s fence keeper (its child running `fence-keeper`).
fn keeper_of(node_pid: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let keeper = String::from_utf8_lossy(&cmdline).contains("fence-keeper");
        (keeper && f.get(1)? == &node_pid.to_string() && !matches!(f[0], "Z" | "X")).then_some(pid)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_keeper_is_replaced_and_told_what_runs() {
    // Process groups alone: with cgroups a keeper kills its whole cgroup tree when its
    // node dies, which would hide a replacement that was never told the task's group.
    let (mut c, _dir, pgid) =
        node_running_a_sleeper(&[("ORCHESTRATOR_EXECUTOR__SHELL_CGROUPS", "false")]).await;
    // Someone kills the keeper while the task runs.
    let node = c.pid(1).expect("node pid");
    let first = keeper_of(node).expect("the node's keeper");
    // As root the keeper runs ahead of the attempts (nice -10): after a thaw on a busy
    // machine it is scheduled before what it is to kill.
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let stat = std::fs::read_to_string(format!("/proc/{first}/stat")).expect("stat");
        let nice = stat[stat.rfind(')').expect("comm") + 2..]
            .split_whitespace()
            .nth(16)
            .and_then(|n| n.parse::<i32>().ok());
        assert_eq!(nice, Some(-10), "{stat}");
    }
    // SAFETY: kill(2) only sends a signal.
    unsafe {
        libc::kill(first as i32, libc::SIGKILL);
    }
    let second = wait_for(Duration::from_secs(10), "a new keeper", || async {
        keeper_of(node).filter(|k| *k != first)
    })
    .await;
    println!("keeper {first} killed; keeper {second} took over");
    // The new keeper was told about the running task: it dies with the node.
    c.kill(1);
    let killed = Instant::now();
    let gone = wait_for(
        Duration::from_secs(5),
        "the task's process group to die with its node (the new keeper must hold it)",
        || async { (!group_alive(pgid)).then(|| killed.elapsed()) },
    )
    .await;
    println!("node SIGKILLed: its task's process group was gone after {gone:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_s_tasks_die_before_the_task_moves() {
    // A short lease so the test is quick (the fence deadline is 2 s before it), with
    // room for a slow commit of a renewal on a loaded machine.
    let mut c = Cluster::new(
        3,
        &[
            ("ORCHESTRATOR_EXECUTOR__LEASE_MS", "5000"),
            ("ORCHESTRATOR_EXECUTOR__FENCE_MARGIN_MS", "2000"),
            ("ORCHESTRATOR_EXECUTOR__HEARTBEAT_MS", "300"),
        ],
    );
    c.start_all();
    let leader = c.wait_leader(LONG).await;
    c.wait_ready(LONG).await;
    let t = c.token("acme", ALL_SCOPES);
    let dir = tempfile::tempdir().expect("temp dir");
    let (s, v) = c
        .post(leader, "/dags", &t, &sleeper("sleepy", dir.path()))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let run = trigger(&c, leader, &t, "sleepy").await;
    let pgid = wait_for(LONG, "attempt 1 to start", || async {
        read_pgid(dir.path(), 1)
    })
    .await;
    let (s, v) = c.get(leader, &format!("/runs/{run}"), &t).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let node = v["task_details"]["s"]["attempts"][0]["node"]
        .as_u64()
        .expect("attempt 1's node");
    // Renewals keep it running: for more than a lease, nothing fences it, it stays put.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(6000) {
        assert!(
            group_alive(pgid),
            "attempt 1 died {:?} after it started, with its node running",
            started.elapsed()
        );
        assert!(
            read_pgid(dir.path(), 2).is_none(),
            "attempt 2 started with attempt 1's node running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("attempt 1 runs on node {node} as process group {pgid}; stopping node {node}");

    c.pause(node);
    let stopped = Instant::now();
    // Watch both at once: when attempt 1's group dies, and when attempt 2 starts.
    let mut died = None;
    let started2 = loop {
        if died.is_none() && !group_alive(pgid) {
            died = Some(stopped.elapsed());
        }
        if read_pgid(dir.path(), 2).is_some() {
            break stopped.elapsed();
        }
        assert!(
            stopped.elapsed() < LONG,
            "attempt 2 never started (attempt 1's group died after {died:?})"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    c.resume(node);
    let died = died.unwrap_or_else(|| {
        panic!(
            "attempt 2 started {started2:?} after node {node} stopped while attempt 1's \
             process group {pgid} was still running"
        )
    });
    println!(
        "node {node} stopped: attempt 1 died after {died:?}, attempt 2 started after {started2:?}"
    );
    // Both are dated by the same 10 ms poll (a /proc scan each): a real gap, not one poll.
    assert!(
        died + Duration::from_millis(100) < started2,
        "attempt 1 died after {died:?}, attempt 2 started after {started2:?}"
    );
    // Resumed, the node rejoins; attempt 1 stays lost, attempt 2 runs elsewhere.
    c.wait_converged(LONG).await;
    let (s, v) = c.get(leader, &format!("/runs/{run}"), &t).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let attempts = &v["task_details"]["s"]["attempts"];
    assert_eq!(attempts[0]["state"], "failed", "{v}");
    assert_eq!(attempts[1]["attempt"], 2, "{v}");
    assert_ne!(attempts[1]["node"], node, "{v}");
    c.assert_no_panics();
}

/// True while process `pid` lives (a zombie does not count).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .map(|i| s[i + 2..].starts_with(['Z', 'X', 'x']))
        })
        .is_some_and(|dead| !dead)
}

/// Whether a node here can give its attempts cgroups (a cgroup v2 mount it may write);
/// where it cannot, the node runs them in process groups only, and says so.
fn cgroups_available() -> bool {
    let Ok(mi) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let Some(mount) = mi.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        right
            .starts_with("cgroup2 ")
            .then(|| left.split_whitespace().nth(4))?
    }) else {
        return false;
    };
    let probe = Path::new(mount).join(format!("orchestrator-probe-{}", std::process::id()));
    std::fs::create_dir(&probe).is_ok() && std::fs::remove_dir(&probe).is_ok()
}

/// Kills the escaped processes a failing test would otherwise leave behind.
struct Reap(Vec<i32>);

impl Drop for Reap {
    fn drop(&mut self) {
        for pid in &self.0 {
            // SAFETY: kill(2) only sends a signal.
            unsafe {
                libc::kill(*pid, libc::SIGKILL);
            }
        }
    }
}

/// DAG `name`: a shell task that starts a process outside its own process group
/// (`setsid`) and writes that process's pid to `dir/NAME.pid`, then runs `then`.
fn escaper(name: &str, dir: &Path, then: &str) -> Value {
    let d = dir.display();
    let cmd = format!(
        "setsid sleep 120 </dev/null >/dev/null 2>&1 & echo $! > {d}/{name}.tmp && mv {d}/{name}.tmp {d}/{name}.pid; {then}"
    );
    json!({"dag_id": name, "tasks": [{"task_id": "s", "kind": "shell", "command": cmd}]})
}

fn read_pid(dir: &Path, name: &str) -> Option<i32> {
    std::fs::read_to_string(dir.join(format!("{name}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Submit an [`escaper`] DAG `name` whose task then runs `then`, trigger it, and wait
/// for the escaped process: the run id and that process's pid (left to `reap`).
async fn start_escaper(
    c: &Cluster,
    t: &str,
    dir: &Path,
    reap: &mut Reap,
    name: &str,
    then: &str,
) -> (String, i32) {
    let (s, v) = c.post(1, "/dags", t, &escaper(name, dir, then)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let run = trigger(c, 1, t, name).await;
    let pid = wait_for(LONG, "the escaped process's pid", || {
        let pid = read_pid(dir, name);
        async move { pid }
    })
    .await;
    reap.0.push(pid);
    (run, pid)
}

/// Wait up to 5 s for process `pid` to die.
async fn dies(pid: i32, what: &str) {
    wait_for(Duration::from_secs(5), what, || async {
        (!alive(pid)).then_some(())
    })
    .await;
}

/// A process that leaves its attempt's process group still dies with the attempt: when
/// the attempt ends on its own, when it is cancelled, and when its node is SIGKILLed
/// (the fence keeper kills the attempt's cgroup).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_that_leave_their_group_die_with_their_attempt() {
    if !cgroups_available() {
        println!("skipped: no writable cgroup v2 here, so attempts have no cgroups");
        return;
    }
    let mut c = Cluster::new(1, &[]);
    c.start_all();
    c.wait_leader(LONG).await;
    c.wait_ready(LONG).await;
    let t = c.token("acme", ALL_SCOPES);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut reap = Reap(Vec::new());

    // 1. The attempt ends (successfully) and leaves a daemon behind.
    let (run, pid) = start_escaper(&c, &t, dir.path(), &mut reap, "ends", "true").await;
    wait_for(LONG, "the run to succeed", || async {
        let (_, v) = c.get(1, &format!("/runs/{run}"), &t).await;
        (v["state"] == "done").then_some(())
    })
    .await;
    dies(pid, "the process a finished attempt left to die").await;

    // 2. Cancelled while running.
    let (run, pid) = start_escaper(&c, &t, dir.path(), &mut reap, "cancelled", "sleep 120").await;
    assert!(alive(pid), "the escaped process {pid} runs");
    let (s, v) = c
        .post(1, &format!("/runs/{run}/cancel"), &t, &json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    dies(pid, "the process a cancelled attempt left to die").await;

    // 3. The node is SIGKILLed while the attempt runs.
    let (_, pid) = start_escaper(&c, &t, dir.path(), &mut reap, "orphaned", "sleep 120").await;
    assert!(alive(pid), "the escaped process {pid} runs");
    c.kill(1);
    let killed = Instant::now();
    dies(pid, "the process the attempt of a killed node left to die").await;
    println!(
        "node SIGKILLed: the process that left its attempt's group was gone after {:?}",
        killed.elapsed()
    );
}

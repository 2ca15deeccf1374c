//! The attack matrix: each test mounts one attack from issue 9 against real nodes and
//! asserts the refusal.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::{wait_for, Cluster, BASE};
use reqwest::StatusCode;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(90);

async fn up(n: u64, env: &[(&str, &str)]) -> Cluster {
    let mut c = Cluster::new(n, env);
    c.start_all();
    c.wait_leader(LONG).await;
    c.wait_ready(LONG).await;
    c
}

/// One node with shell on as in production (no dev mode, attempts as `nobody`) and
/// `env`; None (the test skips) where the suite does not run as root. Its directories
/// are outside /tmp, as a production data dir is: an isolated attempt sees them
/// (read-only), where it would not see a /tmp of the node's at all.
async fn up_with_shell_user(env: &[(&str, &str)]) -> Option<Cluster> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("skipped: switching users needs root");
        return None;
    }
    let mut all = vec![
        ("ORCHESTRATOR_DEV_MODE", ""),
        ("ORCHESTRATOR_EXECUTOR__SHELL_USER", "nobody"),
    ];
    all.extend_from_slice(env);
    let mut c = Cluster::new_in(std::path::Path::new("/var/lib"), 1, &all);
    c.start_all();
    c.wait_leader(LONG).await;
    c.wait_ready(LONG).await;
    Some(c)
}

fn shell_dag(dag_id: &str, command: &str) -> Value {
    json!({"dag_id": dag_id, "tasks": [{"task_id": "t", "kind": "shell", "command": command}]})
}

/// Whether this kernel keeps `pid_max` per PID namespace (Linux 6.14+): an isolated
/// attempt's process limit is then its own namespace's, else its user's RLIMIT_NPROC.
fn per_namespace_pid_max() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split('.');
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: String = parts
        .next()
        .unwrap_or("")
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    (major, minor.parse().unwrap_or(0)) >= (6, 14)
}

/// What a shell prints to show its process limit (read by [`assert_process_limit`]).
const SHOW_PROCESS_LIMIT: &str =
    "echo PIDMAX=$(cat /proc/sys/kernel/pid_max); grep '^Max processes' /proc/self/limits";

/// The isolated attempt whose log is `log` is bounded to `limit` processes: by its PID
/// namespace where the kernel can (`pid_max` = `limit` + 300: at least `limit` PIDs
/// from 300 up, whatever the attempt ran before), else by its user's RLIMIT_NPROC.
fn assert_process_limit(log: &str, limit: u64) {
    if per_namespace_pid_max() {
        let pid_max = format!("PIDMAX={}\n", limit + 300);
        assert!(log.contains(&pid_max), "want {pid_max}: {log}");
    } else {
        let nproc = log
            .lines()
            .find_map(|l| l.strip_prefix("Max processes"))
            .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>());
        let limit = limit.to_string();
        assert_eq!(nproc, Some(vec![limit.as_str(), limit.as_str()]), "{log}");
    }
}

/// Trigger a manual run of `dag_id` and wait for it to finish; returns its task's log.
async fn run_and_log(c: &Cluster, t: &str, dag_id: &str) -> (Value, String) {
    let (s, v) = c
        .post(
            1,
            "/runs",
            t,
            &json!({"dag_id": dag_id, "run_type": "manual"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "trigger: {v}");
    let run = v["run_id"].as_str().expect("run_id").to_string();
    let v = wait_for(LONG, "the run to finish", || async {
        let (s, v) = c.get(1, &format!("/runs/{run}"), t).await;
        (s == StatusCode::OK && ["done", "failed", "cancelled"].contains(&v["state"].as_str()?))
            .then_some(v)
    })
    .await;
    let (s, log) = c
        .get(1, &format!("/runs/{run}/tasks/t/attempts/1/log"), t)
        .await;
    assert_eq!(s, StatusCode::OK, "log: {log}");
    let log = match log {
        Value::String(s) => s,
        other => other.to_string(),
    };
    (v, log)
}

/// The executor reads the grant from the replicated version it runs, not from what the
/// API checked: a shell version stored without one (here taken out of a stopped node's
/// RocksDB, as damage or a bug elsewhere could leave it) runs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shell_version_without_its_grant_in_storage_runs_nothing() {
    use orchestrator::raft::db::Db;
    use orchestrator::state::machine::{keys, Table};
    use orchestrator::state::model::StoredVersion;

    let Some(mut c) = up_with_shell_user(&[]).await else {
        return;
    };
    let t = c.token(
        "acme",
        "orchestrator:read orchestrator:write orchestrator:shell",
    );
    let (s, v) = c.post(1, "/dags", &t, &shell_dag("g", "echo RAN")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (run, log) = run_and_log(&c, &t, "g").await;
    assert_eq!(run["state"], "done", "with its grant it runs: {run} {log}");
    assert!(log.contains("RAN"), "{log}");
    c.terminate(1);
    {
        let db = Db::open(&c.node(1).dir.join("data").join("db")).expect("open the node's db");
        let cf = Table::DagVersions.name();
        let key = keys::dag_version("acme", "g", 1);
        let stored: StoredVersion = db
            .get_json(cf, &key)
            .expect("read the version")
            .expect("version 1 is stored");
        assert!(stored.shell_grant.is_some(), "apply recorded the grant");
        let bare = serde_json::to_vec(&stored.spec).expect("encode the spec");
        db.raw()
            .put_cf(db.cf(cf).expect("the versions table"), &key, bare)
            .expect("store the version without its grant");
    }
    c.start(1);
    c.wait_leader(LONG).await;
    c.wait_ready(LONG).await;
    let (run, log) = run_and_log(&c, &t, "g").await;
    assert_eq!(run["state"], "failed", "{run} {log}");
    assert!(!log.contains("RAN"), "the command ran: {log}");
    let error = run["task_details"]["t"]["attempts"][0]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(error.contains("records no grant"), "{run} {log}");
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_tasks_need_the_shell_scope_and_an_enabled_node() {
    let c = up(1, &[]).await;
    // Write and admin do not imply the shell capability.
    let admin = c.token(
        "acme",
        "orchestrator:read orchestrator:write orchestrator:admin",
    );
    let (s, v) = c.post(1, "/dags", &admin, &shell_dag("sh", "id")).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"], "forbidden", "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("orchestrator:shell"),
        "{v}"
    );
    // The same DAG without shell tasks is fine, and shell with the scope is too.
    let (s, v) = c
        .post(
            1,
            "/dags",
            &admin,
            &json!({"dag_id": "sh", "tasks": [{"task_id": "t", "kind": "noop"}]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let shell = c.token(
        "acme",
        "orchestrator:read orchestrator:write orchestrator:shell",
    );
    let (s, v) = c.post(1, "/dags", &shell, &shell_dag("sh2", "id")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // The admin cannot add a shell task to an existing DAG either.
    let (s, v) = c.post(1, "/dags", &admin, &shell_dag("sh", "id")).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");

    // A node with shell off refuses shell DAGs whatever the scopes.
    let off = up(1, &[("ORCHESTRATOR_EXECUTOR__SHELL_ENABLED", "false")]).await;
    let all = off.admin_token();
    let (s, v) = off.post(1, "/dags", &all, &shell_dag("sh", "id")).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("shell_enabled"),
        "{v}"
    );
    // Dev mode with shell on and no shell_user runs attempts as the node: allowed for a
    // trial, with a warning; with shell off there is nothing to warn about.
    let warning = "dev mode with shell tasks on";
    assert!(c.log(1).contains(warning), "{}", c.log(1));
    assert!(!off.log(1).contains(warning), "{}", off.log(1));
    c.assert_no_panics();
    off.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tenant_s_shell_attempts_can_run_as_a_user_of_its_own() {
    let Some(c) = up_with_shell_user(&[
        // A uid without a passwd entry is a user all the same.
        ("ORCHESTRATOR_EXECUTOR__TENANTS__BETA__SHELL_USER", "54321"),
    ])
    .await
    else {
        return;
    };
    let scopes = "orchestrator:read orchestrator:write orchestrator:shell";
    let (acme, beta) = (c.token("acme", scopes), c.token("beta", scopes));
    // acme (the node-wide user) leaves a file in its working dir and runs on.
    let dag = shell_dag(
        "keep",
        &format!(
            "id -u; echo acme-private > $HOME/mine; echo HOME=$HOME; \
             {SHOW_PROCESS_LIMIT}; sleep 120"
        ),
    );
    let (s, v) = c.post(1, "/dags", &acme, &dag).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = trigger(&c, &acme, "keep").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let acme_run = v["run_id"].as_str().expect("run_id").to_string();
    let log = wait_for(LONG, "acme's attempt to print its limits", || async {
        let (s, log) = c
            .get(
                1,
                &format!("/runs/{acme_run}/tasks/t/attempts/1/log"),
                &acme,
            )
            .await;
        let log = log.as_str().unwrap_or_default().to_string();
        (s == StatusCode::OK && log.contains("Max processes")).then_some(log)
    })
    .await;
    // Run as a user of its own with no process limit configured: a fork bomb is bounded.
    assert_process_limit(&log, 1024);
    let uid = |log: &str| log.lines().next().unwrap_or_default().trim().to_string();
    let nobody = uid(&log);
    let home = log
        .lines()
        .find_map(|l| l.strip_prefix("HOME="))
        .expect("acme's working dir")
        .to_string();
    // beta runs as its own uid and cannot read what acme's attempt left, nor list the
    // working dirs' root or a run's dir (which would tell it others' run and task ids):
    // they are not in its view at all (its own tmpfs), or not listable.
    let root = std::path::Path::new(&home)
        .ancestors()
        .nth(3)
        .expect("the working dirs' root")
        .display()
        .to_string();
    let run_dir = std::path::Path::new(&home)
        .ancestors()
        .nth(2)
        .expect("acme's run dir")
        .display()
        .to_string();
    let dag = shell_dag(
        "peek",
        &format!(
            "id -u; cat {home}/mine 2>&1; ls {home} 2>&1; ls {root} 2>&1; ls {run_dir} 2>&1; exit 0"
        ),
    );
    let (s, v) = c.post(1, "/dags", &beta, &dag).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (run, log) = run_and_log(&c, &beta, "peek").await;
    assert_eq!(run["state"], "done", "{run} {log}");
    assert_eq!(uid(&log), "54321", "{log}");
    assert_ne!(nobody, "54321");
    assert!(
        !log.contains("acme-private"),
        "beta read acme's file: {log}"
    );
    assert_eq!(
        log.matches("Permission denied").count() + log.matches("No such file").count(),
        4,
        "beta reached acme's working dir, or listed the dirs above it: {log}"
    );
    // What an attempt writes stays in its own tmpfs, off the node's disk; its working
    // dir (the mount point) goes with it.
    assert!(std::path::Path::new(&home).exists());
    assert!(
        !std::path::Path::new(&home).join("mine").exists(),
        "acme's file reached the node's disk"
    );
    let (s, v) = c
        .post(1, &format!("/runs/{acme_run}/cancel"), &acme, &json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    wait_for(LONG, "acme's working dir to be removed", || async {
        (!std::path::Path::new(&home).exists()).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_shell_attempts_see_no_network_no_node_and_have_bounded_space() {
    // A directory of the host with a world-readable file, configured as hidden.
    let host_dir = tempfile::Builder::new()
        .prefix("orchestrator-hidden-")
        .tempdir_in("/var/lib")
        .expect("a dir under /var/lib");
    std::fs::set_permissions(host_dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    std::fs::write(host_dir.path().join("notes"), "host-private\n").expect("write");
    std::fs::set_permissions(
        host_dir.path().join("notes"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    let hidden = format!(r#"["/home", "{}"]"#, host_dir.path().display());
    let Some(c) = up_with_shell_user(&[
        ("ORCHESTRATOR_EXECUTOR__SHELL_MAX_DISK_BYTES", "4000000"),
        ("ORCHESTRATOR_EXECUTOR__SHELL_HIDDEN_PATHS", &hidden),
        // beta may use the node's network; acme (the default) may not.
        (
            "ORCHESTRATOR_EXECUTOR__TENANTS__BETA__SHELL_NETWORK",
            "host",
        ),
    ])
    .await
    else {
        return;
    };
    let scopes = "orchestrator:read orchestrator:write orchestrator:shell";
    let (acme, beta) = (c.token("acme", scopes), c.token("beta", scopes));
    let health = format!("http://{}:{}/healthz", c.node(1).host, c.node(1).api_port);
    let marker = format!("orchestrator-isolation-{}", std::process::id());
    let command = format!(
        "echo PID=$$; echo NET; cat /proc/net/dev; \
         echo CURL; curl -sS -m 5 {health} 2>&1; echo curl-rc=$?; \
         echo ROFS; touch /usr/{marker} 2>&1; \
         echo hello > /tmp/{marker} && echo tmp-ok; \
         head -c 8000000 /dev/zero 2>&1 > $HOME/big; echo disk-rc=$?; \
         echo PROCS=$(ls /proc | grep -c '^[0-9]'); grep -E 'NoNewPrivs|Seccomp:' /proc/self/status; \
         echo USERNS; unshare -Ur id 2>&1; echo userns-rc=$?; \
         cat {notes} 2>&1; echo HOME_ENTRIES=$(ls -A /home | wc -l); \
         sleep 1.5; echo INIT=$(tr '\\0' ' ' < /proc/1/cmdline); \
         echo RUN=$(ls -A /run | wc -l); exit 0",
        notes = host_dir.path().join("notes").display()
    );
    for t in [&acme, &beta] {
        let (s, v) = c.post(1, "/dags", t, &shell_dag("look", &command)).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    let (run, log) = run_and_log(&c, &acme, "look").await;
    assert_eq!(run["state"], "done", "{run} {log}");
    // Alone in its PID namespace: the shell is PID 2 (under the namespace's init) and
    // sees only its own processes (not the node, not another attempt of the same user).
    assert!(log.contains("PID=2\n"), "{log}");
    let procs: u32 = log
        .lines()
        .find_map(|l| l.strip_prefix("PROCS="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no PROCS line: {log}"));
    assert!(procs <= 5, "saw {procs} processes: {log}");
    // No network but its own loopback: the node's API (on its loopback address) is out
    // of reach.
    let net = log
        .split("NET\n")
        .nth(1)
        .and_then(|s| s.split("CURL\n").next());
    let interfaces: Vec<&str> = net
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':').map(|(name, _)| name.trim()))
        .collect();
    assert_eq!(interfaces, ["lo"], "{log}");
    assert!(
        !log.contains("\"status\":\"ok\""),
        "reached the node's API: {log}"
    );
    assert!(!log.contains("curl-rc=0"), "{log}");
    // The node's filesystem is read-only; its own /tmp is writable and private; its
    // scratch space is bounded as configured; no new privileges.
    assert!(log.contains("Read-only file system"), "{log}");
    assert!(log.contains("tmp-ok"), "{log}");
    assert!(
        !std::path::Path::new("/tmp").join(&marker).exists(),
        "the attempt's /tmp is the node's"
    );
    assert!(log.contains("No space left on device"), "{log}");
    assert!(log.contains("NoNewPrivs:\t1"), "{log}");
    // Under the syscall filter: no user namespace (in which it would be root again).
    assert!(log.contains("Seccomp:\t2"), "{log}");
    assert!(log.contains("userns-rc=1"), "{log}");
    assert!(
        !log.contains("uid=0"),
        "became root in a user namespace: {log}"
    );
    assert!(log.contains("Operation not permitted"), "{log}");
    // The hidden paths are empty to it: a world-readable file of the host's is not.
    assert!(!log.contains("host-private"), "read a hidden file: {log}");
    assert!(log.contains("HOME_ENTRIES=0\n"), "{log}");
    // Above a shell that runs for over a second, a reaper exec'd afresh (not a fork
    // holding the node's memory); no host service's Unix socket (an empty /run).
    assert!(
        log.contains("INIT=orchestrator __isolation-reaper 2"),
        "{log}"
    );
    assert!(log.contains("RUN=0\n"), "{log}");
    // beta's attempts may use the node's network (tenants.beta.shell_network = host).
    let (run, log) = run_and_log(&c, &beta, "look").await;
    assert_eq!(run["state"], "done", "{run} {log}");
    assert!(log.contains("\"status\":\"ok\""), "{log}");
    assert!(log.contains("curl-rc=0"), "{log}");
    assert!(log.contains("Read-only file system"), "{log}");
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptors_the_node_inherited_do_not_reach_shell_tasks() {
    let mut c = Cluster::new(1, &[]);
    // The node's launcher left the cluster secret's file open as fd 9.
    let secret_file = c.secret_file.clone();
    c.leak_fd9(&secret_file);
    c.start_all();
    c.wait_leader(LONG).await;
    c.wait_ready(LONG).await;
    let t = c.admin_token();
    let (s, v) = c
        .post(
            1,
            "/dags",
            &t,
            &shell_dag("fd", "cat <&9 2>&1; ls /proc/self/fd; exit 0"),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (run, log) = run_and_log(&c, &t, "fd").await;
    assert_eq!(run["state"], "done", "{run} {log}");
    assert!(
        !log.contains(c.secret.as_str()),
        "fd 9 reached the task: {log}"
    );
    assert!(log.contains("Bad file descriptor"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shell_task_sees_no_secrets_and_cannot_read_the_data_dir() {
    // As in production: no dev mode, attempts as a dedicated user.
    let Some(c) = up_with_shell_user(&[
        ("ORCHESTRATOR_EXECUTOR__SHELL_DEFAULT_TIMEOUT_MS", "20000"),
        // Values no shell has by default, so each limit seen below is the node's.
        ("ORCHESTRATOR_EXECUTOR__SHELL_MAX_OPEN_FILES", "333"),
        ("ORCHESTRATOR_EXECUTOR__SHELL_MAX_FILE_BYTES", "12345678"),
        (
            "ORCHESTRATOR_EXECUTOR__SHELL_MAX_MEMORY_BYTES",
            "2147483648",
        ),
        ("ORCHESTRATOR_EXECUTOR__SHELL_MAX_PROCESSES", "777"),
    ])
    .await
    else {
        return;
    };
    let t = c.admin_token();
    let data = c.node(1).dir.join("data");
    let data = data.display();
    let command = format!(
        "echo ENV; env; echo CWD=$(pwd); echo UID=$(id -u); \
         echo NODE_ENVIRON; cat /proc/$PPID/environ | tr '\\0' '\\n'; \
         echo DATA; ls {data} 2>&1; cat {data}/*.secret 2>&1; \
         echo LIMITS; cat /proc/self/limits; {SHOW_PROCESS_LIMIT}; exit 0"
    );
    let (s, v) = c.post(1, "/dags", &t, &shell_dag("peek", &command)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (run, log) = run_and_log(&c, &t, "peek").await;
    assert_eq!(run["state"], "done", "{run} {log}");
    // Neither secret, nor anything of the node's environment, reaches the task.
    for secret in [&c.jwt_secret, &c.secret] {
        assert!(!log.contains(secret.as_str()), "a secret leaked: {log}");
    }
    for var in ["ORCHESTRATOR_AUTH", "RUST_LOG", "ORCHESTRATOR_RATE_LIMIT"] {
        assert!(!log.contains(var), "{var} leaked: {log}");
    }
    let env: Vec<&str> = log
        .split("ENV\n")
        .nth(1)
        .and_then(|s| s.split("CWD=").next())
        .unwrap_or("")
        .lines()
        .filter_map(|l| l.split('=').next())
        .collect();
    for name in &env {
        assert!(
            ["PATH", "LANG", "HOME", "PWD", "SHLVL", "_", "OLDPWD"].contains(name)
                || name.starts_with("ORCHESTRATOR_"),
            "unexpected variable {name}: {log}"
        );
    }
    assert!(env.contains(&"ORCHESTRATOR_RUN_ID"), "{log}");
    // Outside the data dir, as the configured user, under rlimits.
    let cwd = log
        .lines()
        .find_map(|l| l.strip_prefix("CWD="))
        .expect("cwd line");
    assert!(
        !std::path::Path::new(cwd).starts_with(c.node(1).dir.join("data")),
        "{cwd} is in the data dir"
    );
    assert!(log.contains("UID=65534"), "{log}");
    // The data dir (0700, the node's user) cannot even be listed.
    let data_part = log.split("DATA\n").nth(1).unwrap_or("");
    assert!(
        data_part
            .lines()
            .next()
            .is_some_and(|l| l.contains("Permission denied")),
        "the task listed the data dir: {log}"
    );
    // Every configured rlimit, soft and hard (/proc/self/limits: name, soft, hard, unit).
    let limits = log.split("LIMITS\n").nth(1).unwrap_or("");
    for (name, value) in [
        ("Max open files", "333"),
        ("Max file size", "12345678"),
        ("Max address space", "2147483648"),
    ] {
        let line = limits
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} line: {log}"));
        let fields: Vec<&str> = line[name.len()..].split_whitespace().collect();
        assert_eq!(&fields[..2], &[value, value], "{name}: {line}");
    }
    assert_process_limit(&log, 777);
}

/// Two tenants' attempts run as one shell user: one spending its whole process limit
/// leaves the other able to fork, its limit being its own (its PID namespace's where the
/// kernel keeps one per namespace, else its cgroup's `pids.max`), not a budget of the
/// user (RLIMIT_NPROC) that the first has spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenant_s_fork_bomb_leaves_another_s_attempts_of_the_same_user_able_to_fork() {
    if !per_namespace_pid_max() {
        println!("skipped: a process limit per PID namespace needs Linux 6.14 or later");
        return;
    }
    fork_bomb_beside_another_tenant(true, &[]).await;
}

/// The same without namespaces (`shell_isolation = false`): each attempt's cgroup holds
/// it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_isolation_a_fork_bomb_is_held_by_its_cgroup_not_the_user_s_budget() {
    fork_bomb_beside_another_tenant(
        false,
        &[("ORCHESTRATOR_EXECUTOR__SHELL_ISOLATION", "false")],
    )
    .await;
}

/// Three nodes on one host, one shell user (the README's local cluster as root): one
/// tenant's attempts on every node, each at its own process limit, leave another
/// tenant's attempt able to fork. RLIMIT_NPROC counts the user's processes on the whole
/// host, so a per-node budget of it (what an attempt held by its namespace got before)
/// was reached by the three nodes' attempts together (an attack run found it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_sharing_a_host_and_a_shell_user_share_no_process_budget() {
    if !per_namespace_pid_max() {
        println!("skipped: a process limit per PID namespace needs Linux 6.14 or later");
        return;
    }
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("skipped: switching users needs root");
        return;
    }
    let env = [
        ("ORCHESTRATOR_DEV_MODE", ""),
        ("ORCHESTRATOR_EXECUTOR__SHELL_USER", "nobody"),
        ("ORCHESTRATOR_EXECUTOR__SHELL_MAX_PROCESSES", "20"),
    ];
    let mut c = Cluster::new_in(std::path::Path::new("/var/lib"), 3, &env);
    c.start_all();
    c.wait_leader(LONG).await;
    c.wait_ready(LONG).await;
    let scopes = "orchestrator:read orchestrator:write orchestrator:shell";
    let (alpha, beta) = (c.token("alpha", scopes), c.token("beta", scopes));
    // Twelve attempts, spread over the nodes' slots, each starting sleeps until a fork
    // fails (at most 20 + 298 processes in its namespace): together more than one
    // node's old budget of 8 slots x 320.
    let bomb = "(i=0; while [ $i -lt 400 ]; do sleep 60 & i=$((i+1)); echo $i > n; done) \
                2>/dev/null; read n < n; echo started=$n; exec sleep 60";
    let tasks: Vec<Value> = (0..12)
        .map(|i| json!({"task_id": format!("t{i}"), "kind": "shell", "command": bomb}))
        .collect();
    let dag = json!({"dag_id": "bombs", "tasks": tasks});
    let (s, v) = c.post(1, "/dags", &alpha, &dag).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = trigger(&c, &alpha, "bombs").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let bombs = v["run_id"].as_str().expect("run_id").to_string();
    let started = wait_for(
        LONG,
        "alpha's twelve attempts to fork all they may",
        || async {
            let mut total = 0u64;
            for i in 0..12 {
                let path = format!("/runs/{bombs}/tasks/t{i}/attempts/1/log");
                let (s, log) = c.get(1, &path, &alpha).await;
                let n = log
                    .as_str()
                    .filter(|_| s == StatusCode::OK)?
                    .lines()
                    .find_map(|l| l.strip_prefix("started="))?
                    .trim()
                    .parse::<u64>()
                    .ok()?;
                total += n;
            }
            Some(total)
        },
    )
    .await;
    assert!(
        started > 8 * 320,
        "alpha's attempts started {started} processes"
    );
    assert_a_shell_task_forks(&c, &beta).await;
    let (s, v) = c
        .post(1, &format!("/runs/{bombs}/cancel"), &alpha, &json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    c.assert_no_panics();
}

/// A shell task of the tenant `token` is for starts eight processes and ends done.
async fn assert_a_shell_task_forks(c: &Cluster, token: &str) {
    let forks = shell_dag(
        "fork",
        "for i in 1 2 3 4 5 6 7 8; do sleep 0 & done; wait; echo forked",
    );
    let (s, v) = c.post(1, "/dags", token, &forks).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (run, log) = run_and_log(c, token, "fork").await;
    assert_eq!(run["state"], "done", "{run} {log}");
    assert!(log.contains("forked"), "{log}");
}

async fn fork_bomb_beside_another_tenant(isolated: bool, extra_env: &[(&str, &str)]) {
    // Both tenants run as the node-wide shell_user.
    let mut env = vec![("ORCHESTRATOR_EXECUTOR__SHELL_MAX_PROCESSES", "300")];
    env.extend_from_slice(extra_env);
    let Some(c) = up_with_shell_user(&env).await else {
        return;
    };
    let scopes = "orchestrator:read orchestrator:write orchestrator:shell";
    let (acme, beta) = (c.token("acme", scopes), c.token("beta", scopes));
    // acme starts sleeps until a fork fails, says how many, and holds them (`exec`
    // needs no fork; the count is read with builtins).
    // Whether its cgroup (of the v2 hierarchy, alone or beside v1 ones) has pids.max.
    let bomb = "cg=$(grep ^0:: /proc/self/cgroup | cut -d: -f3); \
                for m in /sys/fs/cgroup /sys/fs/cgroup/unified; do \
                  [ -e $m$cg/pids.max ] && echo cgroup=$cg pids.max=$(cat $m$cg/pids.max); done; \
                (i=0; while [ $i -lt 1000 ]; do sleep 120 & i=$((i+1)); echo $i > n; done) \
                2>/dev/null; read n < n; echo started=$n; exec sleep 120";
    let (s, v) = c.post(1, "/dags", &acme, &shell_dag("bomb", bomb)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = trigger(&c, &acme, "bomb").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let bomb_run = v["run_id"].as_str().expect("run_id").to_string();
    let log = wait_for(LONG, "acme's attempt to use up its processes", || async {
        let path = format!("/runs/{bomb_run}/tasks/t/attempts/1/log");
        let (s, log) = c.get(1, &path, &acme).await;
        let log = log.as_str().unwrap_or_default().to_string();
        (s == StatusCode::OK && log.contains("started=")).then_some(log)
    })
    .await;
    if !isolated && !log.contains("pids.max=") {
        println!("skipped: this node's attempts have no cgroup with pids.max: {log}");
        return;
    }
    // Its shell, the subshell and the sleeps: at least 300, at most 300 + 298 (PIDs 2-299
    // of a fresh namespace beside the 300 from 300 up; exactly 300 where a cgroup's
    // pids.max holds it too).
    let processes = log
        .lines()
        .find_map(|l| l.strip_prefix("started="))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .map(|sleeps| sleeps + 2);
    let most = if isolated { 598 } else { 300 };
    assert!(
        processes.is_some_and(|p| (300..=most).contains(&p)),
        "{processes:?}: {log}"
    );
    // beta's attempt, as the same user, starts and forks all the same: the limit is
    // acme's attempt's own, not a budget of the user that acme has spent.
    assert_a_shell_task_forks(&c, &beta).await;
    let (s, v) = c
        .post(1, &format!("/runs/{bomb_run}/cancel"), &acme, &json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    wait_for(LONG, "acme's run to end", || async {
        let (s, v) = c.get(1, &format!("/runs/{bomb_run}"), &acme).await;
        (s == StatusCode::OK && v["state"] == "cancelled").then_some(())
    })
    .await;
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_iss_and_aud_are_required_claims() {
    let c = up(
        1,
        &[
            ("ORCHESTRATOR_AUTH__ISSUER", "https://issuer.test"),
            ("ORCHESTRATOR_AUTH__AUDIENCE", "orchestrator"),
        ],
    )
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let mint = |issuer: Option<&str>, audience: Option<&str>| {
        let req = orchestrator::auth::TokenRequest {
            tenant: "acme",
            subject: "u",
            scope: "orchestrator:read",
            ttl_secs: 600,
            issuer,
            audience,
        };
        orchestrator::auth::mint(&c.jwt_secret, &req, now).expect("mint")
    };
    for (iss, aud, want) in [
        (None, None, StatusCode::UNAUTHORIZED),
        (Some("https://issuer.test"), None, StatusCode::UNAUTHORIZED),
        (None, Some("orchestrator"), StatusCode::UNAUTHORIZED),
        (
            Some("https://issuer.test"),
            Some("orchestrator"),
            StatusCode::OK,
        ),
    ] {
        let (s, v) = c.get(1, "/dags", &mint(iss, aud)).await;
        assert_eq!(s, want, "iss {iss:?} aud {aud:?}: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_admins_cannot_touch_the_cluster() {
    let c = up(1, &[]).await;
    let tenant_admin = c.token("acme", common::ALL_SCOPES);
    let member = json!({"node_id": 7, "api_addr": "127.0.0.1:1", "peer_addr": "127.0.0.1:2"});
    let (s, v) = c.post(1, "/cluster/members", &tenant_admin, &member).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"], "forbidden", "{v}");
    let (s, v, _) = c
        .request(
            1,
            reqwest::Method::DELETE,
            &format!("{BASE}/cluster/members/1"),
            Some(&tenant_admin),
            None,
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, v) = c
        .post(1, "/cluster/snapshot", &tenant_admin, &json!({}))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    // No node addresses for tenants.
    let (s, v) = c.get(1, "/cluster/status", &tenant_admin).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(!v.to_string().contains("127.0.0.1"), "{v}");
    // The operator may, but only with addresses in the peer networks.
    let ops = c.admin_token();
    let (s, v) = c.get(1, "/cluster/status", &ops).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let outside = json!({"node_id": 7, "api_addr": "8.8.8.8:80", "peer_addr": "8.8.8.8:9080"});
    let (s, v) = c.post(1, "/cluster/members", &ops, &outside).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("peer_networks"),
        "{v}"
    );
    // The refused attempts changed nothing: still one member.
    let (_, v) = c.get(1, "/cluster/status", &ops).await;
    assert!(!v.to_string().contains("8.8.8.8"), "{v}");
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_port_refuses_an_unauthenticated_body_without_reading_it() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = up(1, &[]).await;
    let pid = c.pid(1).expect("pid");
    let before = rss_kib(pid);
    let mut s = tokio::net::TcpStream::connect(c.peer_addr(1))
        .await
        .expect("connect");
    let len: usize = 150 << 20;
    let head = format!(
        "POST /raft/append HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.expect("headers");
    // Push the body in chunks until the server stops taking it.
    let chunk = vec![b' '; 1 << 20];
    let mut sent = 0usize;
    let mut answer = Vec::new();
    let pushed = tokio::time::timeout(Duration::from_secs(30), async {
        while sent < len {
            match s.write_all(&chunk).await {
                Ok(()) => sent += chunk.len(),
                Err(_) => break,
            }
        }
    })
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    let after = rss_kib(pid);
    let answer = String::from_utf8_lossy(&answer);
    println!(
        "sent {} MiB of {} before the server stopped reading; RSS {before} -> {after} KiB",
        sent >> 20,
        len >> 20
    );
    assert!(answer.starts_with("HTTP/1.1 401"), "answer: {answer:?}");
    assert!(
        pushed.is_ok() && sent < len,
        "the server kept reading the body ({} MiB)",
        sent >> 20
    );
    assert!(
        after < before + 20 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
    // A flood of refused calls costs no disk: refusals are logged once per 10 s.
    let http = reqwest::Client::new();
    for _ in 0..200 {
        let r = http
            .post(format!("http://{}/raft/vote", c.peer_addr(1)))
            .body("{}")
            .send()
            .await
            .expect("answer");
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    let lines = c.log(1).matches("missing or wrong cluster secret").count();
    assert!(
        (1..=3).contains(&lines),
        "{lines} log lines for 201 refused calls"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_with_unfinished_headers_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = up(1, &[("ORCHESTRATOR_HEADER_READ_TIMEOUT_MS", "1000")]).await;
    let api = format!("{}:{}", c.node(1).host, c.node(1).api_port);
    let peer = c.peer_addr(1);
    // Unfinished headers, and nothing at all, on both listeners.
    let partial: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n";
    for (addr, sent) in [(&api, partial), (&peer, partial), (&api, b""), (&peer, b"")] {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(sent).await.expect("partial headers");
        let started = std::time::Instant::now();
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        assert!(
            r.is_ok(),
            "{addr} ({} bytes sent): still open after 5 s",
            sent.len()
        );
        println!(
            "{addr} ({} bytes sent): closed after {:?}",
            sent.len(),
            started.elapsed()
        );
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "{addr}: closed early"
        );
    }
    // The join probe needs no secret: a body that never finishes is answered (408) and
    // the connection closed within the same bound, not held while it trickles in.
    let mut s = tokio::net::TcpStream::connect(&peer)
        .await
        .expect("connect");
    s.write_all(
        b"POST /cluster/hello HTTP/1.1\r\nHost: x\r\nx-target-node: 1\r\n\
          content-type: application/json\r\ncontent-length: 200\r\n\r\n{\"nonce\":",
    )
    .await
    .expect("headers and the body's start");
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(
        r.is_ok(),
        "an unfinished probe body is still held after 5 s"
    );
    let answer = String::from_utf8_lossy(&buf);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed early"
    );
    // HTTP/2 (prior knowledge, as h2c): the preface, empty SETTINGS and one finished
    // request (HEADERS: GET / on stream 1, HPACK static entries and `:authority: x`).
    // An HTTP/2 connection that has made a request is bounded by no header timeout:
    // served, it would hold its place for ever; the listeners speak HTTP/1.1 only.
    let mut h2: Vec<u8> = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    let block = [0x82, 0x86, 0x84, 0x41, 0x01, b'x'];
    h2.extend_from_slice(&[0, 0, block.len() as u8, 1, 0x05, 0, 0, 0, 1]);
    h2.extend_from_slice(&block);
    for addr in [&api, &peer] {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(&h2).await.expect("h2 request");
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        assert!(
            r.is_ok(),
            "{addr}: an HTTP/2 connection is still open after 5 s"
        );
    }
}

/// A TCP connection to `addr` from `source` (every 127/8 address is this machine).
async fn connect_from(source: &str, addr: &str) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(format!("{source}:0").parse().expect("source address"))
        .expect("bind the source address");
    sock.connect(addr.parse().expect("address"))
        .await
        .expect("connect")
}

/// Whether the server ends `s` (EOF or reset) within `within`, the client having sent
/// nothing.
async fn closed_by_server(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(within, s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// `GET path` over `s`, keeping the connection open: the response's status line ("" if
/// there was none within 5 s). The answer proves the server admitted the connection.
async fn get_over(s: &mut tokio::net::TcpStream, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return String::new();
    }
    // Read the head, then the body its Content-Length announces.
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&buf).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if body.len() >= len {
                    return;
                }
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    String::from_utf8_lossy(&buf)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The value of the metric line naming every one of `labels` (0 if there is none).
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|lb| l.contains(lb)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_caps_are_closed_as_they_arrive() {
    let c = up(
        1,
        &[
            // Idle connections stay open for the test's length unless a cap closes them.
            ("ORCHESTRATOR_HEADER_READ_TIMEOUT_MS", "60000"),
            ("ORCHESTRATOR_ADMISSION__MAX_CONNECTIONS_PER_ADDRESS", "3"),
            ("ORCHESTRATOR_ADMISSION__MAX_PEER_CONNECTIONS", "2"),
        ],
    )
    .await;
    let api = format!("{}:{}", c.node(1).host, c.node(1).api_port);
    let peer = c.peer_addr(1);
    // The API: one client address holds three connections (each answered, so admitted,
    // before the next is opened); its fourth is closed unread.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = connect_from("127.0.0.5", &api).await;
        assert!(get_over(&mut s, "/healthz").await.contains("200"));
        held.push(s);
    }
    let mut fourth = connect_from("127.0.0.5", &api).await;
    assert!(
        closed_by_server(&mut fourth, Duration::from_secs(5)).await,
        "a fourth connection from one address was kept open"
    );
    // Another address is served meanwhile.
    let mut other = connect_from("127.0.0.6", &api).await;
    assert!(
        get_over(&mut other, "/healthz").await.contains("200"),
        "another address was refused"
    );
    // A held connection closes: its address may connect again.
    drop(held.pop());
    wait_for(
        Duration::from_secs(10),
        "a free place for the address",
        || {
            let api = api.clone();
            async move {
                let mut s = connect_from("127.0.0.5", &api).await;
                get_over(&mut s, "/healthz")
                    .await
                    .contains("200")
                    .then_some(())
            }
        },
    )
    .await;
    // The peer listener holds two connections in all, whatever their address (an unknown
    // path answers 404 and keeps the connection).
    let mut peers = Vec::new();
    for source in ["127.0.0.5", "127.0.0.6"] {
        let mut s = connect_from(source, &peer).await;
        assert!(get_over(&mut s, "/nope").await.contains("404"));
        peers.push(s);
    }
    let mut third = connect_from("127.0.0.7", &peer).await;
    assert!(
        closed_by_server(&mut third, Duration::from_secs(5)).await,
        "a third peer connection was kept open"
    );
    assert!(
        !closed_by_server(&mut peers[0], Duration::from_millis(300)).await,
        "a held peer connection was closed"
    );
    let (_, text, _) = c
        .request(1, reqwest::Method::GET, "/metrics", None, None, &[])
        .await;
    let text = text.as_str().unwrap_or_default().to_string();
    let refused = "orchestrator_connections_refused_total";
    assert!(
        metric(
            &text,
            refused,
            &["listener=\"api\"", "reason=\"address_full\""]
        ) >= 1.0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            refused,
            &["listener=\"peer\"", "reason=\"listener_full\""]
        ) >= 1.0,
        "{text}"
    );

    // A node whose peers live in 10/8 closes peer connections from anywhere else.
    let far = up(1, &[("ORCHESTRATOR_PEER_NETWORKS", r#"["10.0.0.0/8"]"#)]).await;
    let mut s = connect_from("127.0.0.5", &far.peer_addr(1)).await;
    assert!(
        closed_by_server(&mut s, Duration::from_secs(5)).await,
        "a peer connection from outside the peer networks was kept open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_that_keeps_failing_to_authenticate_is_refused_unread() {
    // Three failures at once, then one a minute: the test never waits for a refill.
    let c = up(
        1,
        &[
            ("ORCHESTRATOR_ADMISSION__AUTH_FAILURES_PER_MINUTE", "1"),
            ("ORCHESTRATOR_ADMISSION__AUTH_FAILURE_BURST", "3"),
        ],
    )
    .await;
    let good = c.token("acme", "orchestrator:read");
    let from = |source: &str| {
        reqwest::Client::builder()
            .local_address(source.parse::<std::net::IpAddr>().expect("source"))
            .build()
            .expect("client")
    };
    let (attacker, bystander) = (from("127.0.0.5"), from("127.0.0.6"));
    let url = format!("{}{BASE}/dags", c.api(1));
    // Requests that authenticate cost nothing: more than the burst of them pass.
    for _ in 0..5 {
        let r = attacker
            .get(&url)
            .bearer_auth(&good)
            .send()
            .await
            .expect("answer");
        assert_eq!(r.status(), StatusCode::OK);
    }
    for token in ["not-a-token", "x.y.z", &format!("{good}x")] {
        let r = attacker
            .get(&url)
            .bearer_auth(token)
            .send()
            .await
            .expect("answer");
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    // The next request from that address is refused before its token is read, a valid
    // token included.
    let r = attacker
        .get(&url)
        .bearer_auth(&good)
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .expect("Retry-After");
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"], "rate_limited", "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("failed authentications"),
        "{body}"
    );
    // An X-Request-Id is bounded (it would be kept a day): a long one is refused.
    let r = bystander
        .get(&url)
        .bearer_auth(&good)
        .header("x-request-id", "k".repeat(201))
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // Another address is not affected.
    let r = bystander
        .get(&url)
        .bearer_auth(&good)
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), StatusCode::OK);
    let (_, text, _) = c
        .request(1, reqwest::Method::GET, "/metrics", None, None, &[])
        .await;
    let text = text.as_str().unwrap_or_default().to_string();
    assert!(
        metric(
            &text,
            "orchestrator_http_rate_limited_total",
            &["limit=\"auth_failures\""]
        ) >= 1.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_schedule_fires_at_most_once_a_minute() {
    // The harness lowers the limit for the other tests; here the node's default holds.
    let c = up(1, &[("ORCHESTRATOR_LIMITS__MIN_SCHEDULE_INTERVAL_MS", "")]).await;
    let t = c.token("acme", "orchestrator:read orchestrator:write");
    let dag = |id: &str, schedule: &str| json!({"dag_id": id, "schedule": schedule, "tasks": [{"task_id": "t", "kind": "noop"}]});
    for schedule in ["*/30 * * * * *", "* * * * * *"] {
        let (s, v) = c.post(1, "/dags", &t, &dag("fast", schedule)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{schedule}: {v}");
        let msg = v["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains("limits.min_schedule_interval_ms allows at most one run every 60000 ms"),
            "{msg}"
        );
    }
    let (s, v) = c.post(1, "/dags", &t, &dag("minutely", "* * * * *")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // And a task holds an executor slot for a day at most.
    let timed = |timeout: &str| json!({"dag_id": "long", "tasks": [{"task_id": "t", "kind": "noop", "timeout": timeout}]});
    let (s, v) = c.post(1, "/dags", &t, &timed("25h")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let msg = v["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("limits.max_task_timeout_ms allows 86400000 ms"),
        "{msg}"
    );
    let (s, v) = c.post(1, "/dags", &t, &timed("24h")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_quotas_name_the_limit() {
    let c = up(
        1,
        &[
            ("ORCHESTRATOR_LIMITS__MIN_SCHEDULE_INTERVAL_MS", "10000"),
            ("ORCHESTRATOR_LIMITS__MAX_DAGS_PER_TENANT", "2"),
        ],
    )
    .await;
    let t = c.token("acme", "orchestrator:read orchestrator:write");
    let (s, v) = c
        .post(
            1,
            "/dags",
            &t,
            &json!({"dag_id": "hot", "schedule": "*/2 * * * * *"}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("min_schedule_interval_ms"),
        "{v}"
    );
    for id in ["a", "b"] {
        let (s, v) = c
            .post(
                1,
                "/dags",
                &t,
                &json!({"dag_id": id, "schedule": "*/10 * * * * *"}),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    let (s, v) = c.post(1, "/dags", &t, &json!({"dag_id": "c"})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("max_dags_per_tenant"),
        "{v}"
    );
    // Updating an existing DAG is not a new one; another tenant has its own quota.
    let (s, v) = c.post(1, "/dags", &t, &json!({"dag_id": "a"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let other = c.token("other", "orchestrator:read orchestrator:write");
    let (s, v) = c.post(1, "/dags", &other, &json!({"dag_id": "c"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_tasks_cannot_reach_internal_addresses_or_follow_redirects() {
    let c = up(1, &[("ORCHESTRATOR_EXECUTOR__HTTP_ALLOW", "[]")]).await;
    let t = c.token("acme", "orchestrator:read orchestrator:write");
    let peer = format!("http://{}/raft/vote", c.peer_addr(1));
    let api = format!("http://127.0.0.1:{}/healthz", c.node(1).api_port);
    for (name, url) in [
        ("peer", peer.as_str()),
        ("api", api.as_str()),
        ("metadata", "http://169.254.169.254/latest/meta-data/"),
        ("v6", "http://[::1]:9/"),
        ("name", "http://localhost:9/"),
    ] {
        let dag = json!({"dag_id": name, "tasks": [{"task_id": "t", "kind": "http", "url": url}]});
        let (s, v) = c.post(1, "/dags", &t, &dag).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let (run, log) = run_and_log(&c, &t, name).await;
        assert_eq!(run["state"], "failed", "{name}: {run}");
        assert!(log.contains("egress policy"), "{name}: {log}");
    }

    // A redirect is not followed, even to an allowed address.
    let app = axum::Router::new().route(
        "/go",
        axum::routing::get(|| async {
            (
                StatusCode::FOUND,
                [(reqwest::header::LOCATION, "http://169.254.169.254/")],
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = format!("http://{}/go", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let open = up(1, &[]).await;
    let t = open.token("acme", "orchestrator:read orchestrator:write");
    let dag =
        json!({"dag_id": "redir", "tasks": [{"task_id": "t", "kind": "http", "url": target}]});
    let (s, v) = open.post(1, "/dags", &t, &dag).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (run, log) = run_and_log(&open, &t, "redir").await;
    assert_eq!(run["state"], "failed", "{run}");
    assert!(log.starts_with("HTTP 302"), "{log}");
}

/// A local receiver recording each webhook's signature header and body.
async fn hook_receiver() -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<(String, String, String)>>>,
) {
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let g = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let g = g.clone();
            async move {
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string()
                };
                let sig = header("x-orchestrator-signature");
                let timed = format!(
                    "{} {}",
                    header("x-orchestrator-timestamp"),
                    header("x-orchestrator-signature-timed")
                );
                g.lock().unwrap().push((sig, body, timed));
                "ok"
            }
        }),
    );
    // Not 127.0.0.1: that is an address of this host, which no tenant grant opens.
    let listener = tokio::net::TcpListener::bind("127.0.0.9:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, got)
}

/// A local server whose `/go` answers 302 to `to` and `/ok` answers 200, counting hits.
async fn redirector(to: String) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits = std::sync::Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new()
        .route(
            "/go",
            axum::routing::any(move || {
                let (h, to) = (h.clone(), to.clone());
                async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    (StatusCode::FOUND, [(reqwest::header::LOCATION, to)])
                }
            }),
        )
        .route("/ok", axum::routing::get(|| async { "ok" }));
    // Not 127.0.0.1: that is an address of this host, which no tenant grant opens.
    let listener = tokio::net::TcpListener::bind("127.0.0.9:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_obey_the_egress_policy_per_tenant_and_are_signed_per_tenant() {
    let (node_secret, acme_secret) = ("webhook-secret-of-the-node", "webhook-secret-of-acme");
    // No network is open to every tenant; loopback is granted to acme and beta only, and
    // acme signs with a secret of its own.
    let c = up(
        1,
        &[
            ("ORCHESTRATOR_EXECUTOR__HTTP_ALLOW", "[]"),
            ("ORCHESTRATOR_EXECUTOR__WEBHOOK_SECRET", node_secret),
            (
                "ORCHESTRATOR_EXECUTOR__TENANTS__ACME__HTTP_ALLOW",
                r#"["127.0.0.0/8"]"#,
            ),
            (
                "ORCHESTRATOR_EXECUTOR__TENANTS__ACME__WEBHOOK_SECRET",
                acme_secret,
            ),
            (
                "ORCHESTRATOR_EXECUTOR__TENANTS__BETA__HTTP_ALLOW",
                r#"["127.0.0.0/8"]"#,
            ),
        ],
    )
    .await;
    let scopes = "orchestrator:read orchestrator:write";
    let (acme, beta, other) = (
        c.token("acme", scopes),
        c.token("beta", scopes),
        c.token("other", scopes),
    );
    let hook_dag = |dag_id: &str, url: &str| json!({"dag_id": dag_id, "webhook": url, "tasks": [{"task_id": "t", "kind": "noop"}]});
    let submit_and_run = |t: String, dag: Value| {
        let c = &c;
        async move {
            let (s, v) = c.post(1, "/dags", &t, &dag).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            let run = run_to_end(c, &t, dag["dag_id"].as_str().unwrap()).await;
            assert_eq!(run["state"], "done", "{run}");
        }
    };

    // Another tenant's webhooks reach none of loopback, the peer port or the metadata
    // address: refused before connecting.
    let (url, got) = hook_receiver().await;
    let peer = format!("http://{}/raft/append", c.peer_addr(1));
    for (name, target) in [
        ("loop", url.as_str()),
        ("peer", peer.as_str()),
        ("meta", "http://169.254.169.254/latest/meta-data/"),
    ] {
        submit_and_run(other.clone(), hook_dag(name, target)).await;
    }
    wait_for(LONG, "three webhooks refused", || async {
        (c.log(1)
            .matches("webhook refused by the egress policy")
            .count()
            >= 3)
            .then_some(())
    })
    .await;
    assert!(got.lock().unwrap().is_empty(), "a webhook reached loopback");
    assert!(!c.log(1).contains(&url), "the webhook URL was logged");

    // acme's webhook reaches its granted network, signed with acme's own secret.
    let (url, got) = hook_receiver().await;
    submit_and_run(acme.clone(), hook_dag("w", &url)).await;
    let (sig, body, timed) = wait_for(LONG, "acme's webhook", || async {
        got.lock().unwrap().first().cloned()
    })
    .await;
    let sign = orchestrator::executor::egress::signature;
    assert_eq!(sig, sign(acme_secret, body.as_bytes()), "{body}");
    assert_ne!(sig, sign(node_secret, body.as_bytes()));
    // The timed signature covers when it was sent: a receiver can refuse a replay.
    let (ts, timed_sig) = timed.split_once(' ').expect("timestamp and signature");
    let sent: u64 = ts.parse().expect("a Unix time");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    assert!(now.abs_diff(sent) < 120, "sent at {sent}, now {now}");
    let timed_sign = orchestrator::executor::egress::timed_signature;
    assert_eq!(timed_sig, timed_sign(acme_secret, sent, body.as_bytes()));
    // beta has the grant but no secret of its own: the node's.
    let (url, got) = hook_receiver().await;
    submit_and_run(beta.clone(), hook_dag("w", &url)).await;
    let (sig, body, _) = wait_for(LONG, "beta's webhook", || async {
        got.lock().unwrap().first().cloned()
    })
    .await;
    assert_eq!(sig, sign(node_secret, body.as_bytes()), "{body}");

    // A redirect is not followed, even to an address acme may reach: its three tries
    // each get the 302 and the target hears nothing.
    let (url, got) = hook_receiver().await;
    let (base, hits) = redirector(url).await;
    submit_and_run(acme.clone(), hook_dag("redir", &format!("{base}/go"))).await;
    // Given up: the three refused above and this one.
    wait_for(LONG, "the redirecting webhook to be given up", || async {
        (c.log(1).matches("webhook given up").count() >= 4).then_some(())
    })
    .await;
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert!(got.lock().unwrap().is_empty(), "a redirect was followed");

    // http tasks follow the same grants: acme's reaches loopback, another tenant's not;
    // and no grant opens the node's own addresses or this host's (127.0.0.1).
    let own_api = format!("http://{}:{}/healthz", c.node(1).host, c.node(1).api_port);
    let host_addr = format!("http://127.0.0.1:{}/healthz", c.node(1).api_port);
    for (t, url, want) in [
        (&acme, format!("{base}/ok"), "done"),
        (&other, format!("{base}/ok"), "failed"),
        (&acme, own_api, "failed"),
        (&acme, host_addr, "failed"),
    ] {
        let fetch =
            json!({"dag_id": "fetch", "tasks": [{"task_id": "t", "kind": "http", "url": url}]});
        let (s, v) = c.post(1, "/dags", t, &fetch).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let (run, log) = run_and_log(&c, t, "fetch").await;
        assert_eq!(run["state"], want, "{url}: {run} {log}");
        if want == "failed" {
            assert!(log.contains("egress policy"), "{url}: {log}");
            assert!(
                !log.contains("resolves to 127"),
                "the refused address is named: {log}"
            );
        }
    }
}

/// Trigger a manual run and wait for it to finish (no log to fetch).
async fn run_to_end(c: &Cluster, t: &str, dag_id: &str) -> Value {
    let (s, v) = c
        .post(
            1,
            "/runs",
            t,
            &json!({"dag_id": dag_id, "run_type": "manual"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "trigger: {v}");
    let run = v["run_id"].as_str().expect("run_id").to_string();
    let v = wait_for(LONG, "the run to finish", || async {
        let (s, v) = c.get(1, &format!("/runs/{run}"), t).await;
        (s == StatusCode::OK && ["done", "failed", "cancelled"].contains(&v["state"].as_str()?))
            .then_some(v)
    })
    .await;
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_dir_is_private_even_if_it_was_not() {
    let mut c = Cluster::new(1, &[]);
    // An older version left the data dir world-readable.
    let data = c.node(1).dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    c.start_all();
    c.wait_ready(LONG).await;
    let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "data dir mode {mode:o}");
}

/// Run the binary with `args` and `env` until it exits, says it is ready to serve, or
/// `timeout` passes (in the last two cases it is killed): its exit status (None if it was
/// still running), stdout and stderr.
fn run_binary(
    args: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> (Option<std::process::ExitStatus>, String, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_orchestrator"));
    // Only what the test gives: nothing of the caller's ORCHESTRATOR_* settings.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("ORCHESTRATOR_") {
            cmd.env_remove(&name);
        }
    }
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out).expect("stdout file"))
        .stderr(std::fs::File::create(&err).expect("stderr file"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn orchestrator");
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        let ready = std::fs::read_to_string(&out).is_ok_and(|o| o.contains("listening: API"));
        if ready || std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    (status, read(&out), read(&err))
}

/// Two free ports on 127.0.0.1, as `api_addr` and `peer_addr` of a standalone node.
fn two_addrs() -> (String, String) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let b = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    (
        a.local_addr().expect("addr").to_string(),
        b.local_addr().expect("addr").to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_on_the_command_line() {
    // The harness starts nodes the way the docs say: the secret's file, not the secret.
    let c = up(1, &[]).await;
    let pid = c.pid(1).expect("pid");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        !cmdline.contains(&c.secret) && !cmdline.contains(&c.jwt_secret),
        "a secret is on argv: {cmdline}"
    );
    assert!(cmdline.contains("--cluster-secret-file"), "{cmdline}");
    // The node runs with the secret from the file: a peer call carrying it is admitted
    // (anything but 401), one with another secret is not.
    let http = reqwest::Client::new();
    let call = |secret: String| {
        http.post(format!("http://{}/raft/vote", c.peer_addr(1)))
            .header("x-cluster-secret", secret)
            .header("x-target-node", "1")
            .header("content-type", "application/json")
            .body("{}")
            .send()
    };
    let good = call(c.secret.clone()).await.expect("peer answer").status();
    let bad = call(format!("{}x", c.secret))
        .await
        .expect("peer answer")
        .status();
    assert_ne!(
        good,
        StatusCode::UNAUTHORIZED,
        "the file's secret is not used"
    );
    assert_eq!(bad, StatusCode::UNAUTHORIZED);

    // A secret given on argv is refused, with the ways to give it instead.
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data").display().to_string();
    let (api, peer) = two_addrs();
    let (status, _, err) = run_binary(
        &[
            "server",
            "--data-dir",
            &data,
            "--api-addr",
            &api,
            "--peer-addr",
            &peer,
            "--cluster-secret",
            "a-secret-anyone-can-read-in-ps",
        ],
        &[],
        Duration::from_secs(20),
    );
    let status = status.expect("a node with --cluster-secret must exit, not run");
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("--cluster-secret-file") && err.contains("ORCHESTRATOR_CLUSTER_SECRET"),
        "{err}"
    );
    assert!(
        !std::path::Path::new(&data).join("db").exists(),
        "the refused node opened its database"
    );
}

#[test]
fn shell_attempts_that_could_read_the_node_are_refused_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data").display().to_string();
    let (api, peer) = two_addrs();
    let args = [
        "server",
        "--data-dir",
        data.as_str(),
        "--api-addr",
        api.as_str(),
        "--peer-addr",
        peer.as_str(),
    ];
    let shell_on = ("ORCHESTRATOR_EXECUTOR__SHELL_ENABLED", "true");
    // Shell on, no dedicated user: attempts would run as the node's user (root here, or
    // whoever runs the suite) and could read its data dir: the node does not start.
    let (status, _, err) = run_binary(&args, &[shell_on], Duration::from_secs(20));
    let status = status.expect("a node whose shell attempts run as itself must exit");
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("executor.shell_user") && err.contains("dev_mode"),
        "{err}"
    );
    assert!(
        !std::path::Path::new(&data).join("db").exists(),
        "the refused node opened its database"
    );
    // A shell_user that is the node's own uid is the same thing.
    // SAFETY: geteuid(2) has no preconditions.
    let me = unsafe { libc::geteuid() }.to_string();
    let (status, _, err) = run_binary(
        &args,
        &[shell_on, ("ORCHESTRATOR_EXECUTOR__SHELL_USER", &me)],
        Duration::from_secs(20),
    );
    assert!(status.is_some_and(|s| !s.success()), "{err}");
    assert!(err.contains("shell tasks would run as"), "{err}");
    // An explicit local trial runs them as the node's user; shell off needs nothing.
    for env in [
        vec![shell_on, ("ORCHESTRATOR_DEV_MODE", "true")],
        vec![("ORCHESTRATOR_EXECUTOR__SHELL_ENABLED", "false")],
    ] {
        let (status, out, err) = run_binary(&args, &env, Duration::from_secs(20));
        assert!(status.is_none(), "{env:?}: exited {status:?} {err}");
        assert!(out.contains("listening: API"), "{env:?}: {out} {err}");
    }
    if me == "0" {
        // As root with a dedicated user, as the threat model asks.
        let (status, out, err) = run_binary(
            &args,
            &[shell_on, ("ORCHESTRATOR_EXECUTOR__SHELL_USER", "nobody")],
            Duration::from_secs(20),
        );
        assert!(status.is_none(), "exited {status:?} {err}");
        assert!(out.contains("listening: API"), "{out} {err}");
    }
}

#[test]
fn placeholder_secrets_are_refused_outside_dev_mode() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (api, peer) = two_addrs();
    let data = dir.path().join("data");
    // The compose example's former placeholders, as someone who copied them would have.
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "node_id = 1\napi_addr = \"{api}\"\npeer_addr = \"{peer}\"\ndata_dir = \"{}\"\n\
             cluster_secret = \"compose-cluster-secret-change-me\"\n\
             [auth]\nhs256_secret = \"compose-dev-jwt-secret-change-me-0123456789\"\n",
            data.display()
        ),
    )
    .expect("config");
    let config = config.display().to_string();
    let args = ["server", "--config", config.as_str()];
    let (status, _, err) = run_binary(&args, &[], Duration::from_secs(20));
    let status = status.expect("a node with a placeholder secret must exit");
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("cluster_secret is an example's placeholder") && err.contains("dev_mode"),
        "{err}"
    );
    // Only the cluster secret's placeholder replaced: the signing secret's is named next.
    let (status, _, err) = run_binary(
        &args,
        &[(
            "ORCHESTRATOR_CLUSTER_SECRET",
            "a-random-cluster-secret-0123456789",
        )],
        Duration::from_secs(20),
    );
    assert!(status.is_some_and(|s| !s.success()), "{err}");
    assert!(
        err.contains("auth.hs256_secret is an example's placeholder"),
        "{err}"
    );
    // An explicit dev mode accepts them (a local trial): the node serves.
    let (status, out, err) = run_binary(
        &args,
        &[("ORCHESTRATOR_DEV_MODE", "true")],
        Duration::from_secs(15),
    );
    assert!(status.is_none(), "dev mode node exited: {status:?} {err}");
    assert!(out.contains("listening: API"), "{out} {err}");

    // The compose example itself carries no secret: its configs read generated files,
    // and load without dev mode once those exist.
    let secret = dir.path().join("s");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef\n").expect("secret");
    let secret = secret.display().to_string();
    for n in 1..=3 {
        let path = format!("{}/cluster/node{n}.toml", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).expect("compose config");
        for key in ["cluster_secret =", "hs256_secret =", "dev_mode"] {
            assert!(!text.contains(key), "{path} sets {key}");
        }
        let (status, out, err) = run_binary(
            &["config", "print", "--config", &path],
            &[
                ("ORCHESTRATOR_CLUSTER_SECRET_FILE", &secret),
                ("ORCHESTRATOR_AUTH__HS256_SECRET_FILE", &secret),
            ],
            Duration::from_secs(20),
        );
        assert!(status.is_some_and(|s| s.success()), "{path}: {err}");
        assert!(!out.contains("0123456789abcdef"), "{path}: secret printed");
    }
}

#[test]
fn public_keys_and_jwks_need_an_audience_and_https() {
    let fixtures = format!("{}/tests/fixtures", env!("CARGO_MANIFEST_DIR"));
    let rs_pub = format!("{fixtures}/rs256_public.pem");
    let jwks = format!("{fixtures}/jwks.json");
    let refused = |env: &[(&str, &str)], want: &str| {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data").display().to_string();
        let (api, peer) = two_addrs();
        let args = [
            "server",
            "--data-dir",
            &data,
            "--api-addr",
            &api,
            "--peer-addr",
            &peer,
        ];
        let (status, _, err) = run_binary(&args, env, Duration::from_secs(20));
        let status = status.unwrap_or_else(|| panic!("{env:?}: the node started"));
        assert!(!status.success(), "{env:?}: {err}");
        assert!(err.contains(want), "{env:?}: {err}");
    };
    let need_aud = "auth.audience is required";
    refused(
        &[
            ("ORCHESTRATOR_AUTH__ALGORITHMS", r#"["RS256"]"#),
            ("ORCHESTRATOR_AUTH__RS256_PUBLIC_KEY", &rs_pub),
        ],
        need_aud,
    );
    refused(&[("ORCHESTRATOR_AUTH__JWKS_FILE", &jwks)], need_aud);
    refused(
        &[
            ("ORCHESTRATOR_AUTH__ALGORITHMS", r#"["RS256"]"#),
            (
                "ORCHESTRATOR_AUTH__JWKS_URL",
                "https://idp.example.com/jwks",
            ),
        ],
        need_aud,
    );
    refused(
        &[
            ("ORCHESTRATOR_AUTH__ALGORITHMS", r#"["RS256"]"#),
            ("ORCHESTRATOR_AUTH__AUDIENCE", "orchestrator"),
            ("ORCHESTRATOR_AUTH__JWKS_URL", "http://idp.example.com/jwks"),
        ],
        "must be https",
    );
}

/// Wait until the cluster applies protocol 3 (subjects and the fair share start there).
fn token_of(c: &Cluster, tenant: &str, subject: &str, scope: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let req = orchestrator::auth::TokenRequest {
        tenant,
        subject,
        scope,
        ttl_secs: 3600,
        ..Default::default()
    };
    orchestrator::auth::mint(&c.jwt_secret, &req, now).expect("mint")
}

fn message(v: &Value) -> &str {
    v["message"].as_str().unwrap_or("")
}

async fn trigger(c: &Cluster, t: &str, dag_id: &str) -> (StatusCode, Value) {
    c.post(
        1,
        "/runs",
        t,
        &json!({"dag_id": dag_id, "run_type": "manual"}),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_and_task_quotas_name_the_limit() {
    let c = up(
        1,
        &[
            ("ORCHESTRATOR_LIMITS__MAX_TASKS_PER_DAG", "3"),
            ("ORCHESTRATOR_LIMITS__MAX_QUEUED_RUNS_PER_DAG", "2"),
            ("ORCHESTRATOR_LIMITS__MAX_ACTIVE_RUNS_PER_TENANT", "4"),
            (
                "ORCHESTRATOR_LIMITS__TENANTS",
                "{ big = { max_tasks_per_dag = 5 }, sched = { max_queued_runs_per_dag = 1 } }",
            ),
        ],
    )
    .await;
    let scope = "orchestrator:read orchestrator:write orchestrator:shell";
    let acme = c.token("acme", scope);
    let tasks = |n: usize| -> Vec<Value> {
        (0..n)
            .map(|i| json!({"task_id": format!("t{i}"), "kind": "noop"}))
            .collect()
    };
    // Tasks per DAG, with a tenant's override.
    let (s, v) = c
        .post(
            1,
            "/dags",
            &acme,
            &json!({"dag_id": "wide", "tasks": tasks(4)}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(message(&v).contains("limits.max_tasks_per_dag"), "{v}");
    let big = c.token("big", scope);
    let (s, v) = c
        .post(
            1,
            "/dags",
            &big,
            &json!({"dag_id": "wide", "tasks": tasks(4)}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "big's override allows 5: {v}");

    // Queued runs per DAG: one runs (it sleeps), two queue behind max_active_runs = 1.
    let slow = |id: &str| {
        json!({"dag_id": id, "max_active_runs": 1,
               "tasks": [{"task_id": "t", "kind": "shell", "command": "sleep 20"}]})
    };
    for id in ["slow1", "slow2"] {
        let (s, v) = c.post(1, "/dags", &acme, &slow(id)).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    for i in 0..3 {
        let (s, v) = trigger(&c, &acme, "slow1").await;
        assert_eq!(s, StatusCode::OK, "trigger {i}: {v}");
    }
    let (s, v) = trigger(&c, &acme, "slow1").await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(v["error"], "quota_exceeded", "{v}");
    assert!(
        message(&v).contains("limits.max_queued_runs_per_dag"),
        "{v}"
    );
    // Active runs per tenant: 3 of slow1 and one of slow2 make 4, the limit.
    let (s, v) = trigger(&c, &acme, "slow2").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = trigger(&c, &acme, "slow2").await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert!(
        message(&v).contains("limits.max_active_runs_per_tenant"),
        "{v}"
    );
    // Another tenant is not held back by acme's runs.
    let (s, v) = trigger(&c, &big, "wide").await;
    assert_eq!(s, StatusCode::OK, "{v}");

    // Scheduled runs obey the quota too: a DAG firing every second behind a run that
    // sleeps never has more than one queued run (sched's override).
    let sched = c.token("sched", scope);
    let mut dag = slow("tick");
    dag["schedule"] = json!("* * * * * *");
    let (s, v) = c.post(1, "/dags", &sched, &dag).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let count = |state: &'static str| {
        let (c, t) = (&c, &sched);
        async move {
            let (s, v) = c
                .get(1, &format!("/runs?dag_id=tick&state={state}"), t)
                .await;
            assert_eq!(s, StatusCode::OK, "{v}");
            v["runs"].as_array().map_or(0, Vec::len)
        }
    };
    wait_for(LONG, "a running and a queued scheduled run", || async {
        (count("running").await == 1 && count("queued").await == 1).then_some(())
    })
    .await;
    // Five more seconds of windows: none of them adds a queued run.
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < until {
        let queued = count("queued").await;
        assert!(queued <= 1, "{queued} queued scheduled runs");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.assert_no_panics();
}

/// How many of `answers` are 200; every other one must be `refused` naming `limit`.
fn accepted_else_refused(
    answers: &[(StatusCode, Value)],
    refused: StatusCode,
    limit: &str,
) -> usize {
    for (s, v) in answers.iter().filter(|(s, _)| *s != StatusCode::OK) {
        assert_eq!(*s, refused, "{v}");
        assert!(message(v).contains(limit), "{v}");
    }
    answers.iter().filter(|(s, _)| *s == StatusCode::OK).count()
}

async fn v_list(c: &Cluster, t: &str) -> Value {
    c.get(1, "/runs?dag_id=slow&limit=100", t).await.1
}

/// The ids of the runs in `state` of a run list.
fn v_runs(list: &Value, state: &str) -> Vec<String> {
    list["runs"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .filter(|r| r["state"] == state)
                .filter_map(|r| r["run_id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Quotas hold under concurrent writes: apply counts each request against the writes
/// before it (protocol 5), where a check before proposing let every concurrent request
/// through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_never_overshoot_a_quota() {
    let c = up(
        1,
        &[
            ("ORCHESTRATOR_LIMITS__MAX_QUEUED_RUNS_PER_DAG", "3"),
            ("ORCHESTRATOR_LIMITS__MAX_DAGS_PER_TENANT", "5"),
            ("ORCHESTRATOR_LIMITS__MAX_DAG_VERSIONS", "3"),
        ],
    )
    .await;
    c.wait_protocol(6).await;
    let t = c.token(
        "acme",
        "orchestrator:read orchestrator:write orchestrator:shell",
    );
    let dag = json!({"dag_id": "slow", "max_active_runs": 1,
                     "tasks": [{"task_id": "t", "kind": "shell", "command": "sleep 30"}]});
    let (s, v) = c.post(1, "/dags", &t, &dag).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // 40 triggers at once: one runs and three queue; every other one is refused.
    let answers = futures::future::join_all((0..40).map(|_| trigger(&c, &t, "slow"))).await;
    let taken = accepted_else_refused(
        &answers,
        StatusCode::TOO_MANY_REQUESTS,
        "limits.max_queued_runs_per_dag",
    );
    let (_, v) = c.get(1, "/runs?dag_id=slow&limit=100", &t).await;
    let runs = v["runs"].as_array().map_or(0, Vec::len);
    assert_eq!((taken, runs), (4, 4), "1 running + 3 queued, no more: {v}");

    // A refusal is "not now": the same X-Request-Id applies once there is room, and a
    // retry of what was applied gets its answer back even while the quota is full.
    let (runs_path, manual) = (
        format!("{BASE}/runs"),
        json!({"dag_id": "slow", "run_type": "manual"}),
    );
    let keyed = || {
        c.request(
            1,
            reqwest::Method::POST,
            &runs_path,
            Some(&t),
            Some(&manual),
            &[("x-request-id", "retry-me")],
        )
    };
    let (s, v, _) = keyed().await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    let queued = v_runs(&v_list(&c, &t).await, "queued");
    let (s, v) = c
        .post(1, &format!("/runs/{}/cancel", queued[0]), &t, &json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, first, _) = keyed().await;
    assert_eq!(s, StatusCode::OK, "room again, same key: {first}");
    let (s, again, h) = keyed().await;
    assert_eq!(
        s,
        StatusCode::OK,
        "a retry while the quota is full: {again}"
    );
    assert_eq!(again["run_id"], first["run_id"]);
    assert_eq!(
        h.get("idempotent-replayed").map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    // A retry queues a finished run again: with the queue full, it is refused too.
    let (s, v) = c
        .post(1, &format!("/runs/{}/retry", queued[0]), &t, &json!({}))
        .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert!(
        message(&v).contains("limits.max_queued_runs_per_dag"),
        "{v}"
    );

    // Versions: five writes of one DAG keep the newest three. The first has a noop task
    // and a run: its log is still found (empty) once its version is gone.
    let (s, v) = c
        .post(
            1,
            "/dags",
            &t,
            &json!({"dag_id": "v", "owner": "a", "tasks": [{"task_id": "t", "kind": "noop"}]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (noop_run, log) = run_and_log(&c, &t, "v").await;
    assert_eq!(
        (noop_run["state"].as_str(), log.as_str()),
        (Some("done"), "")
    );
    for owner in ["b", "c", "d", "e"] {
        let (s, v) = c
            .post(1, "/dags", &t, &json!({"dag_id": "v", "owner": owner}))
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    let (s, v) = c.get(1, "/dags/v/versions", &t).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let kept: Vec<u64> = v["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .filter_map(|x| x["version"].as_u64())
        .collect();
    assert_eq!(kept, vec![5, 4, 3], "{v}");
    let (s, v) = c.get(1, "/dags/v/versions/1", &t).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert!(message(&v).contains("limits.max_dag_versions"), "{v}");
    let (s, log) = c
        .get(
            1,
            &format!(
                "/runs/{}/tasks/t/attempts/1/log",
                noop_run["run_id"].as_str().unwrap_or_default()
            ),
            &t,
        )
        .await;
    assert_eq!(
        (s, log),
        (StatusCode::OK, json!("")),
        "a pruned version's noop log"
    );

    // DAGs: with two live, 20 concurrent creates make exactly three more.
    let bodies: Vec<Value> = (0..20)
        .map(|i| json!({"dag_id": format!("d{i}")}))
        .collect();
    let creates = futures::future::join_all(bodies.iter().map(|b| c.post(1, "/dags", &t, b))).await;
    let created = accepted_else_refused(
        &creates,
        StatusCode::BAD_REQUEST,
        "limits.max_dags_per_tenant",
    );
    let (_, v) = c.get(1, "/dags?limit=100", &t).await;
    let live = v["dags"].as_array().map_or(0, Vec::len);
    assert_eq!((created, live), (3, 5), "{v}");
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_hold_every_executor_slot() {
    // The fair share alone (the cap below is lifted): freed slots go to the tenant waiting.
    let c = up(
        1,
        &[
            ("ORCHESTRATOR_EXECUTOR__SLOTS", "2"),
            ("ORCHESTRATOR_LIMITS__MAX_SLOT_SHARE_PERCENT", "100"),
        ],
    )
    .await;
    c.wait_protocol(3).await;
    let scope = "orchestrator:read orchestrator:write orchestrator:shell";
    let (hog, other) = (c.token("hog", scope), c.token("other", scope));
    // The hog's run: six parallel tasks of 3 s; it takes both slots first.
    let tasks: Vec<Value> = (0..6)
        .map(|i| json!({"task_id": format!("t{i}"), "kind": "shell", "command": "sleep 3"}))
        .collect();
    let (s, v) = c
        .post(1, "/dags", &hog, &json!({"dag_id": "wide", "tasks": tasks}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let one = json!({"dag_id": "one", "tasks": [{"task_id": "t", "kind": "shell", "command": "sleep 1"}]});
    let (s, v) = c.post(1, "/dags", &other, &one).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = trigger(&c, &hog, "wide").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let hog_run = v["run_id"].as_str().expect("run_id").to_string();
    wait_for(LONG, "the hog to hold both slots", || async {
        let (_, v) = c.get(1, &format!("/runs/{hog_run}"), &hog).await;
        let running = v["tasks"]
            .as_object()?
            .values()
            .filter(|s| *s == "running")
            .count();
        (running == 2).then_some(())
    })
    .await;
    let (s, v) = trigger(&c, &other, "one").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let other_run = v["run_id"].as_str().expect("run_id").to_string();
    // Without a fair share the hog's freed slots go back to it until its six tasks are
    // done (about 9 s); with it, the other tenant's task runs in the first freed slot.
    let other_done = wait_for(LONG, "the other tenant's run to finish", || async {
        let (_, v) = c.get(1, &format!("/runs/{other_run}"), &other).await;
        (v["state"] == "done").then_some(v)
    })
    .await;
    let (_, hog_now) = c.get(1, &format!("/runs/{hog_run}"), &hog).await;
    let hog_left = hog_now["tasks"]
        .as_object()
        .map_or(0, |t| t.values().filter(|s| *s != "done").count());
    println!("other done; hog tasks not done yet: {hog_left}");
    assert!(
        hog_left >= 2,
        "the other tenant waited for the hog: {other_done} {hog_now}"
    );
}

/// Two tenants' long tasks leave a slot for a third: each holds at most its cap (50 % of
/// four slots), and together they stop at the cap while a tenant with a DAG holds none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_long_tasks_leave_slots_for_the_others() {
    let c = up(
        1,
        &[
            ("ORCHESTRATOR_EXECUTOR__SLOTS", "4"),
            ("ORCHESTRATOR_LIMITS__MAX_SLOT_SHARE_PERCENT", "50"),
        ],
    )
    .await;
    c.wait_protocol(9).await;
    let scope = "orchestrator:read orchestrator:write orchestrator:shell";
    let (hog, hog2, other) = (
        c.token("hog", scope),
        c.token("hog2", scope),
        c.token("other", scope),
    );
    let one =
        json!({"dag_id": "one", "tasks": [{"task_id": "t", "kind": "shell", "command": "true"}]});
    let (s, v) = c.post(1, "/dags", &other, &one).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // Each hog's run: six parallel tasks that hold a slot for two minutes each.
    let tasks: Vec<Value> = (0..6)
        .map(|i| json!({"task_id": format!("t{i}"), "kind": "shell", "command": "sleep 120"}))
        .collect();
    let running = |v: &Value| {
        v["tasks"]
            .as_object()
            .map_or(0, |t| t.values().filter(|s| *s == "running").count())
    };
    let mut hog_runs = Vec::new();
    for (t, holds) in [(&hog, 2), (&hog2, 1)] {
        let (s, v) = c
            .post(1, "/dags", t, &json!({"dag_id": "wide", "tasks": tasks}))
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let (s, v) = trigger(&c, t, "wide").await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let run = v["run_id"].as_str().expect("run_id").to_string();
        wait_for(LONG, "the hog to hold its slots", || async {
            let (_, v) = c.get(1, &format!("/runs/{run}"), t).await;
            (running(&v) >= holds).then_some(())
        })
        .await;
        hog_runs.push((t, run));
    }
    // Without the caps the hogs hold all four slots for two minutes and the other
    // tenant's run waits that long; with them, the run finishes at once.
    let (s, v) = trigger(&c, &other, "one").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let other_run = v["run_id"].as_str().expect("run_id").to_string();
    wait_for(LONG, "the other tenant's run to finish", || async {
        let (_, v) = c.get(1, &format!("/runs/{other_run}"), &other).await;
        (v["state"] == "done").then_some(())
    })
    .await;
    // The first hog holds its cap; the second stopped at one, leaving the reserve (free
    // again now that the other tenant's run is done, and kept for it).
    for ((t, run), holds) in hog_runs.iter().zip([2, 1]) {
        let (_, now) = c.get(1, &format!("/runs/{run}"), t).await;
        assert_eq!(running(&now), holds, "{now}");
    }
    for (t, run) in &hog_runs {
        let (s, v) = c
            .post(1, &format!("/runs/{run}/cancel"), t, &json!({}))
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_cursors_are_bound_to_the_tenant() {
    let c = up(1, &[]).await;
    let a = c.token("a", "orchestrator:read orchestrator:write");
    let b = c.token("b", "orchestrator:read orchestrator:write");
    for id in ["d1", "d2", "d3"] {
        for t in [&a, &b] {
            let (s, v) = c
                .post(1, "/dags", t, &json!({"dag_id": id, "tasks": []}))
                .await;
            assert_eq!(s, StatusCode::OK, "{v}");
        }
        let (s, v) = trigger(&c, &a, id).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    let (s, v) = c.get(1, "/dags?limit=1", &a).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let cursor = v["next_cursor"].as_str().expect("a cursor").to_string();
    let (s, v) = c
        .get(1, &format!("/dags?limit=1&cursor={cursor}"), &a)
        .await;
    assert_eq!(s, StatusCode::OK, "the owner pages on: {v}");
    assert_eq!(v["dags"][0]["dag_id"], "d2", "{v}");
    let (s, v) = c
        .get(1, &format!("/dags?limit=1&cursor={cursor}"), &b)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(message(&v).contains("cursor"), "{v}");

    let (s, v) = c.get(1, "/runs?limit=1", &a).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let cursor = v["next_cursor"].as_str().expect("a cursor").to_string();
    let (s, v) = c
        .get(1, &format!("/runs?limit=1&cursor={cursor}"), &b)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    // Nor across queries of the same tenant (another DAG's runs).
    let (s, v) = c
        .get(1, &format!("/runs?dag_id=d1&limit=1&cursor={cursor}"), &a)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_and_triggers_record_the_callers_subject() {
    let c = up(1, &[]).await;
    c.wait_protocol(3).await;
    let scope = "orchestrator:read orchestrator:write";
    let alice = token_of(&c, "acme", "alice", scope);
    let bob = token_of(&c, "acme", "bob", scope);
    let dag = json!({"dag_id": "d", "tasks": [{"task_id": "t", "kind": "noop"}]});
    let (s, v) = c.post(1, "/dags", &alice, &dag).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (_, v) = c.get(1, "/dags/d", &alice).await;
    assert_eq!(
        (v["created_by"].as_str(), v["updated_by"].as_str()),
        (Some("alice"), Some("alice")),
        "{v}"
    );
    let (s, v) = c.post(1, "/dags/d/pause", &bob, &json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (_, v) = c.get(1, "/dags", &alice).await;
    assert_eq!(v["dags"][0]["created_by"], "alice", "{v}");
    assert_eq!(v["dags"][0]["updated_by"], "bob", "{v}");
    let (s, v) = trigger(&c, &bob, "d").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let run = v["run_id"].as_str().expect("run_id").to_string();
    let (_, v) = c.get(1, &format!("/runs/{run}"), &alice).await;
    assert_eq!(v["triggered_by"], "bob", "{v}");
    let (_, v) = c.get(1, "/runs", &alice).await;
    assert_eq!(v["runs"][0]["triggered_by"], "bob", "{v}");

    // Ids that name directories are refused.
    for bad in [".", ".."] {
        let dag = json!({"dag_id": "x", "tasks": [{"task_id": bad, "kind": "noop"}]});
        let (s, v) = c.post(1, "/dags", &alice, &dag).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
    }

    // Membership changes are audit-logged with the operator's subject.
    let ops = token_of(&c, "ops", "carol-the-operator", common::ALL_SCOPES);
    let (s, v, _) = c
        .request(
            1,
            reqwest::Method::DELETE,
            &format!("{BASE}/cluster/members/9"),
            Some(&ops),
            None,
            &[],
        )
        .await;
    assert_ne!(s, StatusCode::FORBIDDEN, "{v}");
    wait_for(LONG, "the audit line", || async {
        let log = c.log(1);
        log.lines()
            .any(|l| l.contains("audit") && l.contains("carol-the-operator"))
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_peers_need_a_client_certificate_from_the_cluster_ca() {
    let dir = format!("{}/tests/fixtures", env!("CARGO_MANIFEST_DIR"));
    let (cert, key, ca) = (
        format!("{dir}/tls_cert.pem"),
        format!("{dir}/tls_key.pem"),
        format!("{dir}/tls_ca.pem"),
    );
    let c = up(
        1,
        &[
            ("ORCHESTRATOR_TLS__CERT_FILE", &cert),
            ("ORCHESTRATOR_TLS__KEY_FILE", &key),
            ("ORCHESTRATOR_TLS__CA_FILE", &ca),
        ],
    )
    .await;
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap();
    let client = |identity: Option<reqwest::Identity>| {
        let mut b = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca.clone())
            .timeout(Duration::from_secs(10));
        if let Some(id) = identity {
            b = b.identity(id);
        }
        b.build().expect("client")
    };
    let url = format!("https://{}/raft/vote", c.peer_addr(1));
    let call = |http: reqwest::Client| {
        let secret = c.secret.clone();
        let url = url.clone();
        async move {
            http.post(url)
                .header("x-cluster-secret", secret)
                .header("x-target-node", "1")
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
        }
    };
    // Knowing the cluster secret is not enough: no client certificate, no peer call.
    let r = call(client(None)).await;
    assert!(
        r.is_err(),
        "a peer call without a client certificate was answered: {r:?}"
    );
    // A node's certificate from the cluster CA gets through to the secret check.
    let pem = [std::fs::read(&cert).unwrap(), std::fs::read(&key).unwrap()].concat();
    let identity = reqwest::Identity::from_pem(&pem).expect("identity");
    let r = call(client(Some(identity))).await.expect("mutual TLS");
    assert_ne!(r.status(), StatusCode::UNAUTHORIZED);
    // The API listener asks no client certificate of API callers.
    let t = c.token("acme", "orchestrator:read");
    let (s, v) = c.get(1, "/dags", &t).await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

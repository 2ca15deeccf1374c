//! Running one task attempt: `shell` (`/bin/sh -c` in its own process group, only when
//! the node's [`sandbox::ShellPolicy`] enables it, with a cleared environment, rlimits,
//! optionally another user, a working dir per attempt outside the data dir, identity and
//! window in the environment and in `{{ }}` templates, when run as another user in the
//! namespaces of [`isolation`] (no network, a read-only node, one bounded tmpfs, its own
//! `/proc`), killed as a group — and, where the node can create one, as a whole
//! [`cgroup`] — on timeout, cancel or its end), `http` (method, URL, headers, body,
//! expected status, all templated; through the node's [`egress::Egress`] policy, the
//! answer read only up to the log cap) and `noop`. Output goes to a per-attempt log file
//! with a size cap. Nothing here knows Raft: the executor actor reports the
//! [`AttemptResult`].

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

pub mod cgroup;
pub mod egress;
pub mod fencing;
pub mod isolation;
pub mod leftovers;
pub mod sandbox;
pub mod syscall_filter;

use crate::state::command::AttemptResult;
use crate::state::model::{Run, TaskKind, TaskSpec};

/// Without a task timeout, an http task gives up after this long.
const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(60);

/// Where an attempt's output lives on the node that ran it.
pub fn log_path(data_dir: &Path, run_id: &str, task_id: &str, attempt: u32) -> PathBuf {
    data_dir
        .join("logs")
        .join(run_id)
        .join(task_id)
        .join(format!("{attempt}.log"))
}

fn fmt_ms(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// The identity and window a task sees, as `(name, value)` pairs.
pub fn variables(run: &Run, task_id: &str, attempt: u32) -> Vec<(&'static str, String)> {
    vec![
        ("run_id", run.run_id.clone()),
        ("dag_id", run.dag_id.clone()),
        ("task_id", task_id.to_string()),
        ("attempt", attempt.to_string()),
        ("window_start", fmt_ms(run.window.start_ms)),
        ("window_end", fmt_ms(run.window.end_ms)),
        ("run_type", format!("{:?}", run.run_type).to_lowercase()),
    ]
}

/// Replace `{{ name }}` (spaces optional) with the variable's value; unknown names stay.
pub fn render(template: &str, vars: &[(&'static str, String)]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        match after.find("}}") {
            Some(close) => {
                let name = after[..close].trim();
                match vars.iter().find(|(n, _)| *n == name) {
                    Some((_, v)) => out.push_str(v),
                    None => out.push_str(&rest[open..open + 2 + close + 2]),
                }
                rest = &after[close + 2..];
            }
            None => {
                out.push_str(&rest[open..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Copy a stream into the shared log file until the cap, then keep draining.
async fn capture(
    mut from: impl AsyncRead + Unpin,
    log: std::sync::Arc<tokio::sync::Mutex<(tokio::fs::File, u64)>>,
    cap: u64,
) {
    let mut buf = vec![0u8; 8192];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut guard = log.lock().await;
        let (file, written) = &mut *guard;
        if *written < cap {
            let take = ((cap - *written) as usize).min(n);
            let _ = file.write_all(&buf[..take]).await;
            *written += take as u64;
            if *written >= cap {
                let _ = file
                    .write_all(b"\n[output truncated at the log cap]\n")
                    .await;
            }
            // tokio writes in the background: flush so the log is complete when the
            // attempt is reported finished.
            let _ = file.flush().await;
        }
    }
}

/// Everything needed to run one attempt.
pub struct AttemptSpec<'a> {
    pub run: &'a Run,
    pub task: &'a TaskSpec,
    pub attempt: u32,
    pub data_dir: &'a Path,
    pub log_cap: u64,
    pub egress: &'a egress::Egress,
    pub shell: &'a sandbox::ShellPolicy,
    /// The version's shell tasks were granted to their writer (`orchestrator:shell`,
    /// recorded by apply from protocol 11): without it no command is run.
    pub shell_granted: bool,
    /// Checked again just before a process starts: past it, nothing is spawned.
    pub fence: &'a fencing::AttemptFence,
}

/// Run the attempt to its end, its timeout, or `cancel`.
/// `on_pgid` receives the shell's process group id as soon as it exists.
pub async fn run_attempt(
    a: AttemptSpec<'_>,
    cancel: oneshot::Receiver<()>,
    on_pgid: impl FnOnce(i32),
) -> AttemptResult {
    let vars = variables(a.run, &a.task.task_id, a.attempt);
    let log_file = log_path(a.data_dir, &a.run.run_id, &a.task.task_id, a.attempt);
    let timeout = a.task.timeout_ms.map(Duration::from_millis);
    match &a.task.kind {
        TaskKind::Noop => {
            // An empty log, so the attempt's log is found on its node like any other
            // kind's, even once its DAG version (which says the task is a noop) is gone.
            write_log(&log_file, "").await;
            AttemptResult::Success { exit_code: None }
        }
        TaskKind::Shell { command } => {
            // Checked again here: the node that accepted the DAG may not be this one, and
            // the grant is read from the replicated version, not from the API's check.
            let refused = if !a.shell.enabled {
                Some(sandbox::Error::Disabled)
            } else if !a.shell_granted {
                Some(sandbox::Error::NotGranted)
            } else {
                None
            };
            if let Some(refused) = refused {
                let error = refused.to_string();
                write_log(&log_file, &error).await;
                return AttemptResult::Failed {
                    exit_code: None,
                    error,
                };
            }
            let cmd = render(command, &vars);
            let timeout = Some(timeout.unwrap_or(a.shell.default_timeout));
            run_shell(&cmd, &vars, &a, &log_file, timeout, cancel, on_pgid).await
        }
        TaskKind::Http {
            method,
            url,
            headers,
            body,
            expect_status,
        } => {
            let url = render(url, &vars);
            let method =
                reqwest::Method::from_bytes(method.as_bytes()).unwrap_or(reqwest::Method::GET);
            let limit = timeout.unwrap_or(DEFAULT_HTTP_TIMEOUT);
            let client = match a.egress.client_for(&a.run.tenant, &url, limit).await {
                Ok(c) => c,
                Err(e) => {
                    let error = format!("http {}: {e}", egress::origin(&url));
                    write_log(&log_file, &error).await;
                    return AttemptResult::Failed {
                        exit_code: None,
                        error,
                    };
                }
            };
            let mut req = client.request(method, &url);
            for (k, v) in headers {
                req = req.header(k.as_str(), render(v, &vars));
            }
            if let Some(b) = body {
                req = req.body(render(b, &vars));
            }
            let send = async {
                match req.send().await {
                    // The origin only, and the error without its URL: a path or query may
                    // carry a token, and this error is logged and kept in the run. The log
                    // holds it too, as it holds every other failure's.
                    Err(e) if e.is_timeout() => {
                        let error = format!("http {}: timed out", egress::origin(&url));
                        write_log(&log_file, &error).await;
                        AttemptResult::TimedOut { error }
                    }
                    Err(e) => {
                        let error = format!("http {}: {}", egress::origin(&url), e.without_url());
                        write_log(&log_file, &error).await;
                        AttemptResult::Failed {
                            exit_code: None,
                            error,
                        }
                    }
                    Ok(mut resp) => {
                        let status = resp.status().as_u16();
                        // Read only up to the log cap: a huge answer is never buffered.
                        let mut out = format!("HTTP {status}\n").into_bytes();
                        let cap = out.len() + a.log_cap as usize;
                        while out.len() < cap {
                            match resp.chunk().await {
                                Ok(Some(chunk)) => {
                                    let take = (cap - out.len()).min(chunk.len());
                                    out.extend_from_slice(&chunk[..take]);
                                }
                                Ok(None) | Err(_) => break,
                            }
                        }
                        write_log(&log_file, &String::from_utf8_lossy(&out)).await;
                        let ok = match expect_status {
                            Some(s) => status == *s,
                            None => (200..300).contains(&status),
                        };
                        if ok {
                            AttemptResult::Success { exit_code: None }
                        } else {
                            AttemptResult::Failed {
                                exit_code: None,
                                error: format!("http {}: status {status}", egress::origin(&url)),
                            }
                        }
                    }
                }
            };
            tokio::select! {
                r = send => r,
                _ = cancel => {
                    write_log(&log_file, "cancelled").await;
                    AttemptResult::Failed { exit_code: None, error: "cancelled".into() }
                }
            }
        }
    }
}

async fn write_log(path: &Path, text: &str) {
    if let Some(dir) = path.parent() {
        let _ = tokio::fs::create_dir_all(dir).await;
    }
    let _ = tokio::fs::write(path, text).await;
}

/// Remove per-run directories (under each of `roots`: the log dir, the shell work root)
/// not modified for longer than `keep`. Returns how many run directories went.
pub fn remove_older_than(roots: &[PathBuf], keep: Duration) -> usize {
    let mut removed = 0;
    for root in roots {
        let Ok(entries) = std::fs::read_dir(root) else {
            continue;
        };
        for e in entries.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > keep);
            if old && std::fs::remove_dir_all(e.path()).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

/// Create an attempt's working dir (`root/run/task/attempt`), its own user's alone
/// (0700). The run and task dirs above it are 0711, and so is the root when the node
/// owns it and it is no shared sticky directory (`/tmp`): an attempt can pass through
/// them to its own, but cannot list them, so it learns no other run's or task's id.
async fn prepare_work_dir(
    root: &Path,
    work: &Path,
    identity: Option<(u32, u32)>,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    tokio::fs::create_dir_all(work).await?;
    for dir in work.ancestors().skip(1) {
        if !dir.starts_with(root) {
            break;
        }
        if dir == root {
            use std::os::unix::fs::MetadataExt;
            let meta = tokio::fs::metadata(dir).await?;
            // SAFETY: geteuid(2) has no preconditions.
            let mine = meta.uid() == unsafe { libc::geteuid() };
            if !mine || meta.mode() & 0o1000 != 0 {
                break;
            }
        }
        tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).await?;
    }
    tokio::fs::set_permissions(work, std::fs::Permissions::from_mode(0o700)).await?;
    if let Some((uid, gid)) = identity {
        std::os::unix::fs::chown(work, Some(uid), Some(gid))?;
    }
    Ok(())
}

/// Kill a whole process group, and its attempt's cgroup (every process it started,
/// in the group or not) when the node has them.
pub fn kill_group(pgid: i32, cgroups: Option<&cgroup::Cgroups>) {
    if pgid > 0 {
        // SAFETY: killpg(2) only sends a signal; a stale pgid at worst hits nothing.
        unsafe {
            libc::killpg(pgid, libc::SIGKILL);
        }
        if let Some(c) = cgroups {
            c.kill(pgid);
        }
    }
}

async fn run_shell(
    cmd: &str,
    vars: &[(&'static str, String)],
    a: &AttemptSpec<'_>,
    log_file: &Path,
    timeout: Option<Duration>,
    mut cancel: oneshot::Receiver<()>,
    on_pgid: impl FnOnce(i32),
) -> AttemptResult {
    let identity = match a.shell.identity_for(&a.run.tenant) {
        Ok(i) => i,
        Err(e) => {
            return AttemptResult::Failed {
                exit_code: None,
                error: e.to_string(),
            }
        }
    };
    let work = a
        .shell
        .work_root
        .join(&a.run.run_id)
        .join(&a.task.task_id)
        .join(a.attempt.to_string());
    if let Err(e) = prepare_work_dir(&a.shell.work_root, &work, identity).await {
        return AttemptResult::Failed {
            exit_code: None,
            error: format!("cannot create working dir {}: {e}", work.display()),
        };
    }
    if let Some(dir) = log_file.parent() {
        let _ = tokio::fs::create_dir_all(dir).await;
    }
    let file = match tokio::fs::File::create(log_file).await {
        Ok(f) => f,
        Err(e) => {
            return AttemptResult::Failed {
                exit_code: None,
                error: format!("cannot create log {}: {e}", log_file.display()),
            }
        }
    };
    let isolation = match a.shell.isolation_for(&a.run.tenant, &work, identity) {
        Ok(i) => i,
        Err(e) => {
            return AttemptResult::Failed {
                exit_code: None,
                error: format!("cannot isolate the attempt in {}: {e}", work.display()),
            }
        }
    };
    let mut command = tokio::process::Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(cmd)
        .current_dir(&work)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .env_clear()
        .envs(sandbox::environment(vars, &work));
    // Compiled before the fork (never in the child), for attempts of a shell user only.
    let filter = match identity.map(|_| syscall_filter::get()).transpose() {
        Ok(f) => f,
        Err(e) => {
            return AttemptResult::Failed {
                exit_code: None,
                error: e.to_string(),
            }
        }
    };
    let processes = a
        .shell
        .process_limits(identity.is_some(), isolation.as_ref());
    let cgroups = a.shell.cgroups.as_ref();
    let join = cgroups.map(|c| c.for_child(processes.pids_max, a.shell.limits.memory_bytes));
    // SAFETY: the closure only makes async-signal-safe syscalls (see `sandbox::in_child`,
    // `isolation::Isolation::enter` and `cgroup::ChildCgroup::join`), and joins its
    // cgroup and enters its namespaces while still the node's user.
    // A failed join is not the attempt's failure: it runs in its process group only (the
    // parent says so below).
    unsafe {
        command.pre_exec(move || {
            let cgroup_bound = join
                .as_ref()
                .is_some_and(|j| j.join().is_ok() && j.holds_processes());
            if let Some(i) = &isolation {
                i.enter()?;
            }
            sandbox::in_child(processes.rlimits(cgroup_bound), identity, filter)
        });
    }
    // Stopped (cancelled, lease lost) while being prepared: never start the process.
    if a.fence.expired() || !matches!(cancel.try_recv(), Err(oneshot::error::TryRecvError::Empty)) {
        return AttemptResult::Failed {
            exit_code: None,
            error: "cancelled before it started".into(),
        };
    }
    // Off the async workers: an isolated spawn forks, joins namespaces and mounts.
    let spawned = tokio::task::spawn_blocking(move || command.spawn())
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            return AttemptResult::Failed {
                exit_code: None,
                error: format!("cannot start /bin/sh: {e}"),
            }
        }
    };
    let pgid = child.id().map(|p| p as i32).unwrap_or(0);
    on_pgid(pgid);
    if let Some(c) = cgroups.filter(|c| !c.has_group(pgid)) {
        tracing::warn!(run_id = %a.run.run_id, task_id = %a.task.task_id, attempt = a.attempt, pgid,
                       parent = %c.parent().display(),
                       "the attempt could not join a cgroup of its own: it runs in its process group only");
    }
    let log = std::sync::Arc::new(tokio::sync::Mutex::new((file, 0u64)));
    let mut pumps = Vec::new();
    if let Some(out) = child.stdout.take() {
        pumps.push(tokio::spawn(capture(out, log.clone(), a.log_cap)));
    }
    if let Some(err) = child.stderr.take() {
        pumps.push(tokio::spawn(capture(err, log.clone(), a.log_cap)));
    }
    let limit = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        status = child.wait() => match status {
            Ok(s) if s.success() => AttemptResult::Success { exit_code: Some(0) },
            Ok(s) => AttemptResult::Failed {
                exit_code: s.code(),
                error: exit_error(s),
            },
            Err(e) => AttemptResult::Failed { exit_code: None, error: format!("wait failed: {e}") },
        },
        _ = limit => {
            kill_group(pgid, cgroups);
            let _ = child.wait().await;
            AttemptResult::TimedOut { error: format!("timed out after {} ms; process group killed", timeout.map_or(0, |t| t.as_millis())) }
        }
        _ = cancel => {
            kill_group(pgid, cgroups);
            let _ = child.wait().await;
            AttemptResult::Failed { exit_code: None, error: "cancelled; process group killed".into() }
        }
    };
    // Nothing the attempt started outlives it (with a cgroup, not even a process that
    // left the group); grandchildren may still hold the pipes open: do not wait for them
    // forever.
    kill_group(pgid, cgroups);
    if let Some(c) = cgroups {
        c.release(pgid).await;
    }
    for p in pumps {
        let _ = tokio::time::timeout(Duration::from_secs(2), p).await;
    }
    // The working dir is the attempt's scratch space (its log is kept apart): it goes
    // with the attempt, so what attempts write cannot pile up on the node's disk.
    if let Err(e) = tokio::fs::remove_dir_all(&work).await {
        tracing::debug!(run_id = %a.run.run_id, task_id = %a.task.task_id, attempt = a.attempt,
               error = %e, "working dir not removed; the retention sweep will");
    }
    result
}

/// What a failed shell says of how it ended: its exit code, or the signal that killed
/// it. An exit code 128 + N is what a shell reports for a child killed by signal N (and
/// what an isolated attempt's reaper reports for its shell: a namespace's init cannot
/// die of its own signal), so the signal is named beside it.
fn exit_error(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => match c.checked_sub(128).and_then(signal_name) {
            Some(name) => format!("exit code {c} (as after {name}, signal {})", c - 128),
            None => format!("exit code {c}"),
        },
        (None, Some(n)) => match signal_name(n) {
            Some(name) => format!("killed by {name} (signal {n})"),
            None => format!("killed by signal {n}"),
        },
        (None, None) => format!("ended with {status}"),
    }
}

/// The signals a task ends by, by number (the same on every Linux architecture we build
/// for; the rest are named by number alone).
fn signal_name(n: i32) -> Option<&'static str> {
    Some(match n {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGSYS => "SIGSYS",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_run_dirs_are_removed_and_recent_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("logs/run_1/t")).unwrap();
        std::fs::create_dir_all(dir.path().join("work/run_1/t/1")).unwrap();
        let roots = [dir.path().join("logs"), dir.path().join("work")];
        assert_eq!(remove_older_than(&roots, Duration::from_secs(3600)), 0);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(remove_older_than(&roots, Duration::from_millis(1)), 2);
        assert!(!dir.path().join("logs/run_1").exists());
    }

    #[tokio::test]
    async fn a_shell_task_whose_version_records_no_grant_runs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::config::Config {
            data_dir: dir.path().join("data"),
            ..Default::default()
        };
        config.executor.shell_enabled = true;
        let shell = sandbox::ShellPolicy::from_config(&config);
        let egress = egress::Egress::from_config(&config).unwrap();
        let marker = dir.path().join("ran");
        let mut spec = crate::state::machine::tests::spec("d");
        spec.tasks[0].kind = TaskKind::Shell {
            command: format!("touch {}", marker.display()),
        };
        let run = crate::state::progress::tests::run_of(&spec);
        let task = spec.tasks[0].clone();
        let fence = fencing::AttemptFence::new(
            std::time::Instant::now() + Duration::from_secs(60),
            i64::MAX,
        );
        let attempt = |granted: bool, attempt: u32| {
            let (_keep, cancel) = oneshot::channel();
            let a = AttemptSpec {
                run: &run,
                task: &task,
                attempt,
                data_dir: &config.data_dir,
                log_cap: 4096,
                egress: &egress,
                shell: &shell,
                shell_granted: granted,
                fence: &fence,
            };
            async move {
                let r = run_attempt(a, cancel, |_| {}).await;
                drop(_keep);
                r
            }
        };
        let refused = attempt(false, 1).await;
        let AttemptResult::Failed { error, .. } = &refused else {
            panic!("an ungranted shell task must fail, got {refused:?}");
        };
        assert!(error.contains("orchestrator:shell"), "{error}");
        assert!(!marker.exists(), "the ungranted command ran");
        let log =
            std::fs::read_to_string(log_path(&config.data_dir, &run.run_id, &task.task_id, 1))
                .unwrap();
        assert!(log.contains("records no grant"), "{log}");
        // The same attempt with the grant runs (the refusal above is the check's, not
        // the harness's).
        let ran = attempt(true, 2).await;
        assert!(matches!(ran, AttemptResult::Success { .. }), "{ran:?}");
        assert!(marker.exists());
    }

    #[test]
    fn a_failed_shell_names_its_exit_code_or_its_signal() {
        use std::os::unix::process::ExitStatusExt;
        // Raw wait statuses: an exit code in the second byte, a signal in the first.
        let exited = |c: i32| exit_error(std::process::ExitStatus::from_raw(c << 8));
        let killed = |n: i32| exit_error(std::process::ExitStatus::from_raw(n));
        assert_eq!(exited(2), "exit code 2");
        assert_eq!(exited(137), "exit code 137 (as after SIGKILL, signal 9)");
        assert_eq!(exited(128), "exit code 128");
        assert_eq!(killed(9), "killed by SIGKILL (signal 9)");
        assert_eq!(
            killed(libc::SIGUSR1),
            format!("killed by signal {}", libc::SIGUSR1)
        );
    }

    #[test]
    fn templates_render_known_names_and_keep_unknown() {
        let vars = vec![
            ("run_id", "run_7".to_string()),
            ("attempt", "2".to_string()),
        ];
        assert_eq!(
            render("echo {{run_id}}-{{ attempt }} {{ other }}", &vars),
            "echo run_7-2 {{ other }}"
        );
        assert_eq!(render("unclosed {{ run_id", &vars), "unclosed {{ run_id");
    }
}

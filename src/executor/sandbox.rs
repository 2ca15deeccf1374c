//! What a shell attempt may use: whether shell runs at all on this node, the user it runs
//! as, the working-dir root outside the data dir, a cleared environment, rlimits and
//! no new privileges applied in the child between fork and exec, and (for an attempt
//! run as another user) the namespaces of [`super::isolation`].

use std::path::PathBuf;
use std::time::Duration;

use super::cgroup::Cgroups;
use super::isolation::{self, Isolation};
use super::syscall_filter::{self, SyscallFilter};
use crate::config::{Config, ShellNetwork};

/// The environment's `PATH` for an attempt; nothing of the node's own environment passes.
const SAFE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("shell tasks are disabled on this node (executor.shell_enabled = false)")]
    Disabled,
    #[error(
        "refused: this DAG version records no grant of its shell tasks (its writer must hold \
         the orchestrator:shell scope); apply the DAG again with such a token"
    )]
    NotGranted,
    #[error("executor.shell_user '{0}' does not exist on this node")]
    UnknownUser(String),
    #[error(
        "executor.shell_user '{user}' is set but the node does not run as root and cannot \
         switch to it; run the node as root or unset executor.shell_user"
    )]
    CannotSwitch { user: String },
    #[error(
        "shell tasks would run as {who}, which can read this node's data dir, its secrets and \
         every tenant's attempts: run the node as root with executor.shell_user set to a \
         dedicated unprivileged user, turn shell tasks off (executor.shell_enabled = false), \
         or for a local trial only set dev_mode = true (ORCHESTRATOR_DEV_MODE=true)"
    )]
    SharedIdentity { who: String },
    #[error(
        "executor.shell_user '{user}' could read {what} {path}: shell attempts must not reach \
         the node's secrets; make it the node's own (mode 0600, or a 0700 directory)"
    )]
    SecretReachable {
        user: String,
        what: &'static str,
        path: PathBuf,
    },
    #[error(
        "shell attempts cannot be isolated on this node ({reason}): run the node as root \
         with CAP_SYS_ADMIN on Linux 5.12 or later, or set executor.shell_isolation = false \
         (attempts then share the node's network and may write wherever their user can)"
    )]
    CannotIsolate { reason: String },
    #[error(
        "shell attempts run as executor.shell_user cannot be given their syscall filter on \
         this node ({reason}): it needs Linux seccomp filters (CONFIG_SECCOMP_FILTER) on \
         x86_64, aarch64 or riscv64"
    )]
    CannotFilter { reason: String },
}

/// Resource limits per attempt; 0 leaves the node's own limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// As configured; `None` is [`Limits::processes`]'s default.
    pub processes: Option<u64>,
    pub file_bytes: u64,
    pub open_files: u64,
    pub memory_bytes: u64,
    /// Scratch space of an isolated attempt (its tmpfs).
    pub disk_bytes: u64,
}

/// The process limit of an attempt run as a user of its own when none is configured:
/// bounds a fork bomb far below the machine's limit (with the default 8 slots, a user's
/// isolated attempts hold at most 8 × 1,324 PIDs together), far above what a task of
/// one slot starts.
pub const DEFAULT_MAX_PROCESSES: u64 = 1024;

impl Limits {
    /// The process limit (RLIMIT_NPROC, and `pids.max` where the attempt has a cgroup)
    /// of an attempt run as another user (`as_other_user`) or as the node's own. As
    /// configured, else [`DEFAULT_MAX_PROCESSES`] for another user and none for the
    /// node's own: RLIMIT_NPROC counts every process and thread of the user, so for the
    /// node's own user (dev mode) it would count the node's threads and whatever else
    /// that user runs.
    pub fn processes(&self, as_other_user: bool) -> u64 {
        match self.processes {
            Some(n) => n,
            None if as_other_user => DEFAULT_MAX_PROCESSES,
            None => 0,
        }
    }
}

/// This node's shell policy, from its configuration.
#[derive(Debug, Clone)]
pub struct ShellPolicy {
    pub enabled: bool,
    /// Who runs attempts of tenants without a user of their own.
    pub user: Option<String>,
    /// Tenants whose attempts run as a user of their own.
    pub tenant_users: std::collections::BTreeMap<String, String>,
    pub work_root: PathBuf,
    pub default_timeout: Duration,
    pub limits: Limits,
    /// Whether attempts run as another user get namespaces of their own.
    pub isolation: bool,
    /// Their network, unless their tenant has its own setting.
    pub network: ShellNetwork,
    pub tenant_networks: std::collections::BTreeMap<String, ShellNetwork>,
    /// The node's executor slots: at most this many attempts at once.
    pub slots: u32,
    /// What isolated attempts see empty (`executor.shell_hidden_paths`).
    pub hidden_paths: Vec<PathBuf>,
    /// The tenants' network namespaces (`ShellNetwork::None`).
    pub networks: isolation::Networks,
    /// Where attempts get their cgroups (set by the executor where it can create them).
    pub cgroups: Option<Cgroups>,
}

impl ShellPolicy {
    pub fn from_config(c: &Config) -> ShellPolicy {
        let e = &c.executor;
        ShellPolicy {
            enabled: e.shell_enabled,
            user: e.shell_user.clone(),
            tenant_users: e
                .tenants
                .iter()
                .filter_map(|(t, s)| Some((t.clone(), s.shell_user.clone()?)))
                .collect(),
            // Absolute: it becomes the attempt's HOME and working dir, and a relative
            // data dir (the dev server's `./orchestrator-data`) made a relative HOME.
            work_root: std::path::absolute(c.shell_work_dir())
                .unwrap_or_else(|_| c.shell_work_dir()),
            default_timeout: Duration::from_millis(e.shell_default_timeout_ms),
            limits: Limits {
                processes: e.shell_max_processes,
                file_bytes: e.shell_max_file_bytes,
                open_files: e.shell_max_open_files,
                memory_bytes: e.shell_max_memory_bytes,
                disk_bytes: e.shell_max_disk_bytes,
            },
            isolation: e.shell_isolation,
            network: e.shell_network,
            tenant_networks: e
                .tenants
                .iter()
                .filter_map(|(t, s)| Some((t.clone(), s.shell_network?)))
                .collect(),
            slots: e.slots,
            hidden_paths: e.shell_hidden_paths.clone(),
            networks: Default::default(),
            cgroups: None,
        }
    }

    /// Refuse to start a node whose shell attempts could read what the node guards: with
    /// shell on, an attempt must run as a user that is neither root nor the node's own,
    /// and that user must not reach the data dir or a secret file kept elsewhere (dev
    /// mode waives both for a local trial, with a warning at start). A `shell_user` that
    /// does not exist or cannot be switched to is refused in every mode.
    /// Each tenant's own `shell_user` is held to the same rules.
    pub fn check_at_start(&self, c: &Config) -> Result<(), Error> {
        if !self.enabled {
            return Ok(());
        }
        let users = std::iter::once(self.user.as_ref()).chain(self.tenant_users.values().map(Some));
        let private_network = self.network == ShellNetwork::None
            || self
                .tenant_networks
                .values()
                .any(|n| *n == ShellNetwork::None);
        for user in users {
            let identity = identity_of(user)?;
            if identity.is_some() {
                syscall_filter::probe().map_err(|e| Error::CannotFilter {
                    reason: e.to_string(),
                })?;
            }
            if let (true, Some((uid, gid))) = (self.isolation, identity) {
                isolation::probe(uid, gid, &self.limits, private_network).map_err(|e| {
                    Error::CannotIsolate {
                        reason: e.to_string(),
                    }
                })?;
            }
            if let Err(e) = check_identity(identity, user, c) {
                if !c.dev_mode {
                    return Err(e);
                }
                // Allowed for a local trial, but never silently.
                tracing::warn!(
                    reason = %e,
                    "dev mode with shell tasks on: attempts can read what this node guards \
                     (its data dir and secrets); set executor.shell_user before anyone else \
                     can submit a DAG"
                );
            }
        }
        Ok(())
    }

    /// How an attempt run as another user (`as_other_user`) with `isolation` is held to
    /// its process limit: what its cgroup's `pids.max` is (where it gets one), and how
    /// its child sets RLIMIT_NPROC ([`ProcessLimits::rlimits`]).
    pub fn process_limits(
        &self,
        as_other_user: bool,
        isolation: Option<&Isolation>,
    ) -> ProcessLimits {
        let processes = self.limits.processes(as_other_user);
        // An isolated attempt's cgroup counts the two processes above the shell too.
        let above_shell = if isolation.is_some() { 2 } else { 0 };
        ProcessLimits {
            pids_max: processes.saturating_add(above_shell),
            limits: self.limits,
            namespace_bound: isolation.is_some_and(Isolation::bounds_processes),
        }
    }

    /// The uid and gid to switch to for `tenant`'s attempts (its own user, else the
    /// node-wide one), or None to stay the node's user.
    pub fn identity_for(&self, tenant: &str) -> Result<Option<(u32, u32)>, Error> {
        identity_of(self.tenant_users.get(tenant).or(self.user.as_ref()))
    }

    /// The namespaces of `tenant`'s attempt in working dir `work` run as `identity`:
    /// none when it runs as the node's own user or isolation is off.
    pub fn isolation_for(
        &self,
        tenant: &str,
        work: &std::path::Path,
        identity: Option<(u32, u32)>,
    ) -> std::io::Result<Option<Isolation>> {
        let Some((uid, gid)) = identity.filter(|_| self.isolation) else {
            return Ok(None);
        };
        let network = match self.tenant_networks.get(tenant).unwrap_or(&self.network) {
            ShellNetwork::None => Some(self.networks.for_tenant(tenant)?),
            ShellNetwork::Host => None,
        };
        Isolation::new(work, uid, gid, &self.limits, network)
            .and_then(|i| i.hiding(&self.hidden_paths))
            .map(Some)
    }
}

/// An attempt's process limit (see [`ShellPolicy::process_limits`]).
#[derive(Debug, Clone, Copy)]
pub struct ProcessLimits {
    /// Its cgroup's `pids.max`, where it has one with the `pids` controller.
    pub pids_max: u64,
    /// The rlimits otherwise.
    limits: Limits,
    /// Whether its PID namespace holds it ([`Isolation::bounds_processes`]).
    namespace_bound: bool,
}

impl ProcessLimits {
    /// The rlimits its child sets, once it knows whether it joined a cgroup that holds
    /// its processes (`cgroup_bound`). RLIMIT_NPROC counts every process of the user, on
    /// the whole host: as the limit of one attempt it is a budget that one tenant's fork
    /// bomb spends for every other attempt of the same user, and, with several nodes on
    /// one host, of every node. So where something of the attempt's own holds it (its
    /// PID namespace, or its cgroup's `pids.max`) RLIMIT_NPROC is left as the node's;
    /// only an attempt that nothing else holds gets it as its limit.
    pub fn rlimits(&self, cgroup_bound: bool) -> Limits {
        if self.namespace_bound || cgroup_bound {
            Limits {
                processes: Some(u64::MAX),
                ..self.limits
            }
        } else {
            self.limits
        }
    }
}

/// Refuse `identity` (of `user`) for shell attempts: root, the node's own user, or a user
/// that can reach the data dir or a secret file.
fn check_identity(
    identity: Option<(u32, u32)>,
    user: Option<&String>,
    c: &Config,
) -> Result<(), Error> {
    // SAFETY: geteuid(2) has no preconditions.
    let me = unsafe { libc::geteuid() };
    let (uid, gid) = match identity {
        Some((0, _)) => return Err(Error::SharedIdentity { who: "root".into() }),
        Some(id) => id,
        None => {
            let who = if me == 0 {
                "root".to_string()
            } else {
                format!("the node's own user (uid {me})")
            };
            return Err(Error::SharedIdentity { who });
        }
    };
    let guarded = [
        ("the data dir", Some(&c.data_dir)),
        ("cluster_secret_file", c.cluster_secret_file.as_ref()),
        ("auth.hs256_secret_file", c.auth.hs256_secret_file.as_ref()),
        ("tls.key_file", c.tls.key_file.as_ref()),
    ];
    for (what, path) in guarded {
        let Some(path) = path else { continue };
        if reachable_by(path, uid, gid) {
            return Err(Error::SecretReachable {
                user: user.cloned().unwrap_or_default(),
                what,
                path: path.clone(),
            });
        }
    }
    Ok(())
}

/// The uid and gid of `user`, or None to stay the node's user (no user, or the node's).
fn identity_of(user: Option<&String>) -> Result<Option<(u32, u32)>, Error> {
    let Some(name) = user else {
        return Ok(None);
    };
    let (uid, gid) = lookup_user(name).ok_or_else(|| Error::UnknownUser(name.clone()))?;
    // SAFETY: geteuid(2) has no preconditions.
    let me = unsafe { libc::geteuid() };
    if me == uid {
        return Ok(None);
    }
    if me != 0 {
        return Err(Error::CannotSwitch { user: name.clone() });
    }
    Ok(Some((uid, gid)))
}

/// Whether `uid`/`gid` could open `path` (read a file, list a directory): every directory
/// above it searchable and the path itself readable by that user, by the mode bits of
/// each (its supplementary groups aside). A path that does not exist yet is judged by
/// what exists above it.
fn reachable_by(path: &std::path::Path, uid: u32, gid: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    let may = |m: &std::fs::Metadata, bits: u32| {
        let mode = m.mode();
        if m.uid() == uid {
            mode & (bits << 6) != 0
        } else if m.gid() == gid {
            mode & (bits << 3) != 0
        } else {
            mode & bits != 0
        }
    };
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    for dir in path.ancestors().skip(1) {
        if let Ok(m) = std::fs::metadata(dir) {
            if !may(&m, 0o1) {
                return false;
            }
        }
    }
    match std::fs::metadata(&path) {
        Ok(m) => may(&m, 0o4),
        // Not there yet: created by the node (0700 dir, 0600 files).
        Err(_) => false,
    }
}

/// The whole environment an attempt gets: a fixed `PATH`, `LANG`, `HOME` (its working
/// dir) and the `ORCHESTRATOR_*` run variables.
pub fn environment(
    vars: &[(&'static str, String)],
    home: &std::path::Path,
) -> Vec<(String, String)> {
    let mut env = vec![
        ("PATH".to_string(), SAFE_PATH.to_string()),
        ("LANG".to_string(), "C.UTF-8".to_string()),
        ("HOME".to_string(), home.display().to_string()),
    ];
    for (name, value) in vars {
        env.push((
            format!("ORCHESTRATOR_{}", name.to_ascii_uppercase()),
            value.clone(),
        ));
    }
    env
}

/// A user name (or numeric uid) to its uid and primary gid.
fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let cname = std::ffi::CString::new(name).ok()?;
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and `buf` outlives it.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc == 0 && !result.is_null() {
        return Some((pwd.pw_uid, pwd.pw_gid));
    }
    let uid: u32 = name.parse().ok()?;
    // SAFETY: as above.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc == 0 && !result.is_null() {
        Some((pwd.pw_uid, pwd.pw_gid))
    } else {
        Some((uid, uid))
    }
}

/// A start-time probe: run `/bin/true` with `setup` between fork and exec; Ok if it ran
/// and succeeded, else why not.
///
/// # Safety
/// `setup` runs in the forked child: async-signal-safe calls only.
pub unsafe fn probe_with(
    setup: impl FnMut() -> std::io::Result<()> + Send + Sync + 'static,
) -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    let mut command = std::process::Command::new("/bin/true");
    command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: the caller's promise.
    unsafe { command.pre_exec(setup) };
    let status = command.status()?;
    match status.success() {
        true => Ok(()),
        false => Err(std::io::Error::other(format!(
            "the probe ended with {status}"
        ))),
    }
}

/// Lower one rlimit to `value` (never above the current hard limit).
/// Async-signal-safe: only getrlimit/setrlimit.
fn lower(resource: libc::__rlimit_resource_t, value: u64) -> std::io::Result<()> {
    if value == 0 {
        return Ok(());
    }
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `cur` is a valid out pointer.
    if unsafe { libc::getrlimit(resource, &mut cur) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let v = (value as libc::rlim_t).min(cur.rlim_max);
    let new = libc::rlimit {
        rlim_cur: v,
        rlim_max: v,
    };
    // SAFETY: `new` is a valid pointer.
    if unsafe { libc::setrlimit(resource, &new) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs in the child after fork, before exec (and after [`Isolation::enter`]): rlimits,
/// then drop to `identity` for good: no setuid program or file capability can raise the
/// attempt's privileges again, and the calls of [`syscall_filter`] are refused to it and
/// everything it starts. Only async-signal-safe calls.
pub fn in_child(
    limits: Limits,
    identity: Option<(u32, u32)>,
    filter: Option<&SyscallFilter>,
) -> std::io::Result<()> {
    lower(libc::RLIMIT_NPROC, limits.processes(identity.is_some()))?;
    lower(libc::RLIMIT_FSIZE, limits.file_bytes)?;
    lower(libc::RLIMIT_NOFILE, limits.open_files)?;
    lower(libc::RLIMIT_AS, limits.memory_bytes)?;
    lower(libc::RLIMIT_CORE, 1)?;
    if let Some((uid, gid)) = identity {
        // SAFETY: plain syscalls; order matters (groups and gid while still root).
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // A session keyring of its own, not the node's (shared by every attempt,
            // a channel between tenants). Where keyrings are not built in, none.
            libc::syscall(
                libc::SYS_keyctl,
                libc::KEYCTL_JOIN_SESSION_KEYRING,
                std::ptr::null::<libc::c_char>(),
            );
        }
        // Last: it refuses keyctl, which the line above needed. The caller passes one
        // with every identity; none would leave the attempt unfiltered.
        match filter {
            Some(f) => f.install()?,
            None => return Err(std::io::Error::other("no syscall filter for a shell user")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_is_only_path_lang_home_and_run_variables() {
        let vars = vec![
            ("run_id", "run_1".to_string()),
            ("attempt", "2".to_string()),
        ];
        let env = environment(&vars, std::path::Path::new("/w"));
        let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "PATH",
                "LANG",
                "HOME",
                "ORCHESTRATOR_RUN_ID",
                "ORCHESTRATOR_ATTEMPT"
            ]
        );
    }

    fn policy(user: Option<&str>) -> ShellPolicy {
        ShellPolicy {
            enabled: true,
            user: user.map(str::to_string),
            tenant_users: Default::default(),
            work_root: PathBuf::from("/tmp"),
            default_timeout: Duration::from_secs(1),
            limits: Limits::default(),
            isolation: false,
            network: ShellNetwork::None,
            tenant_networks: Default::default(),
            slots: 8,
            hidden_paths: Vec::new(),
            networks: Default::default(),
            cgroups: None,
        }
    }

    #[test]
    fn the_work_root_is_absolute_even_beside_a_relative_data_dir() {
        let c = Config {
            data_dir: PathBuf::from("orchestrator-data"),
            ..Config::default()
        };
        let root = ShellPolicy::from_config(&c).work_root;
        assert!(root.is_absolute(), "{}", root.display());
        assert!(
            root.ends_with("orchestrator-data-work"),
            "{}",
            root.display()
        );
    }

    #[test]
    fn rlimit_nproc_holds_an_attempt_only_where_nothing_of_its_own_does() {
        let mut p = policy(Some("nobody"));
        p.limits.processes = Some(300);
        let limits = p.process_limits(true, None);
        assert_eq!(limits.pids_max, 300);
        // Nothing of its own (no namespace bound, no cgroup joined with pids.max): the
        // user's RLIMIT_NPROC is its limit.
        assert_eq!(limits.rlimits(false).processes, Some(300));
        // Its cgroup holds it: RLIMIT_NPROC is left as the node's (`lower` keeps the
        // inherited limit for u64::MAX), so it is no budget another attempt spends.
        assert_eq!(limits.rlimits(true).processes, Some(u64::MAX));
        let bound = ProcessLimits {
            namespace_bound: true,
            ..limits
        };
        assert_eq!(bound.rlimits(false).processes, Some(u64::MAX));
        assert_eq!(bound.rlimits(false).open_files, p.limits.open_files);
    }

    #[test]
    fn processes_are_bounded_by_default_only_for_another_user() {
        let default = Limits::default();
        assert_eq!(default.processes(true), DEFAULT_MAX_PROCESSES);
        assert_eq!(
            default.processes(false),
            0,
            "the node's own user: left alone"
        );
        let set = Limits {
            processes: Some(77),
            ..Limits::default()
        };
        assert_eq!((set.processes(true), set.processes(false)), (77, 77));
        let off = Limits {
            processes: Some(0),
            ..Limits::default()
        };
        assert_eq!(
            off.processes(true),
            0,
            "0 leaves the node's limit, as configured"
        );
    }

    #[test]
    fn shell_as_the_nodes_own_user_or_root_is_refused_outside_dev_mode() {
        // SAFETY: geteuid(2) has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let (prod, dev) = (
            Config::default(),
            Config {
                dev_mode: true,
                ..Config::default()
            },
        );
        let err = policy(None).check_at_start(&prod).unwrap_err().to_string();
        let who = if root {
            "run as root"
        } else {
            "the node's own user"
        };
        assert!(err.contains(who) && err.contains("dev_mode"), "{err}");
        policy(None)
            .check_at_start(&dev)
            .expect("dev mode waives it");
        let off = ShellPolicy {
            enabled: false,
            ..policy(None)
        };
        off.check_at_start(&prod).expect("shell off needs no user");
        if root {
            let err = policy(Some("0"))
                .check_at_start(&prod)
                .unwrap_err()
                .to_string();
            assert!(err.contains("run as root,"), "{err}");
            // A data dir the node will create (0700) under one nobody can search.
            let dir = tempfile::tempdir().unwrap();
            let data = dir.path().join("data");
            let open = |p: &std::path::Path, mode: u32| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
            };
            open(dir.path(), 0o755);
            let with = |secret: Option<PathBuf>| Config {
                data_dir: data.clone(),
                cluster_secret_file: secret,
                ..Config::default()
            };
            policy(Some("nobody"))
                .check_at_start(&with(None))
                .expect("a dedicated user is what the check asks for");
            // A tenant's own user: used for its attempts, and held to the same rules.
            let mut per_tenant = policy(Some("nobody"));
            per_tenant
                .tenant_users
                .insert("beta".into(), "54321".into());
            assert_eq!(
                per_tenant.identity_for("beta").unwrap(),
                Some((54321, 54321))
            );
            assert_eq!(
                per_tenant.identity_for("acme").unwrap(),
                lookup_user("nobody")
            );
            per_tenant
                .check_at_start(&with(None))
                .expect("both dedicated");
            per_tenant
                .tenant_users
                .insert("gamma".into(), "root".into());
            let err = per_tenant
                .check_at_start(&with(None))
                .unwrap_err()
                .to_string();
            assert!(err.contains("run as root,"), "{err}");
            // A secret file outside the data dir that nobody could read is refused.
            let secret = dir.path().join("cluster.secret");
            std::fs::write(&secret, "s").unwrap();
            open(&secret, 0o644);
            let err = policy(Some("nobody"))
                .check_at_start(&with(Some(secret.clone())))
                .unwrap_err()
                .to_string();
            assert!(err.contains("cluster_secret_file"), "{err}");
            open(&secret, 0o600);
            policy(Some("nobody"))
                .check_at_start(&with(Some(secret.clone())))
                .expect("a 0600 secret of the node's");
            // A readable file behind a directory nobody cannot enter is out of its reach.
            open(&secret, 0o644);
            open(dir.path(), 0o700);
            policy(Some("nobody"))
                .check_at_start(&with(Some(secret)))
                .expect("a readable file in a directory nobody cannot enter");
        } else {
            let err = policy(Some("nobody"))
                .check_at_start(&dev)
                .unwrap_err()
                .to_string();
            assert!(err.contains("cannot switch"), "{err}");
        }
        let err = policy(Some("no-such-user-orchestrator"))
            .check_at_start(&dev)
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not exist"), "{err}");
    }

    #[test]
    fn a_missing_user_is_named() {
        let err = policy(Some("no-such-user-orchestrator"))
            .identity_for("t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no-such-user-orchestrator"), "{err}");
    }
}

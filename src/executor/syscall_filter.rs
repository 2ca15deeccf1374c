//! The system calls a shell attempt run as another user may not make: a seccomp filter
//! installed last, just before the shell is exec'd (after the user switch and
//! `PR_SET_NO_NEW_PRIVS`), inherited by everything the attempt starts.
//!
//! A deny list, not an allow list: tasks run whatever a tenant's shell runs (compilers,
//! interpreters, database clients), so the list holds only what an unprivileged process
//! could still do and a task has no business doing, each a kernel surface that has been
//! a way out of sandboxes like ours (the same calls Docker's default profile refuses):
//! - new user namespaces (`unshare`, `setns`, `clone` with `CLONE_NEWUSER`): inside one
//!   the attempt would hold every capability again, and with them mounts, network
//!   namespaces and the rest of the kernel's privileged code. `clone3` passes its flags
//!   in memory a filter cannot read, so it answers ENOSYS and the C library falls back
//!   to `clone`, which the filter can judge;
//! - the kernel's keyrings (`keyctl`, `add_key`, `request_key`): not namespaced, so a
//!   channel between tenants that share a user;
//! - `bpf`, `perf_event_open`, `userfaultfd` and io_uring: kernel attack surface and
//!   exploitation aids, of no use to a batch task;
//! - mounts, module loading, kexec, reboot, swap, accounting, quotas and the kernel log:
//!   already refused to a process without capabilities, refused here too in case a
//!   capability is ever left to it.
//!
//! Everything else is allowed. Refused calls answer EPERM (ENOSYS for `clone3`), so
//! tools see an ordinary "Operation not permitted". A call of another architecture
//! (32-bit x86 on x86_64) kills the process: the numbers above mean other calls there.
//! x32 calls share x86_64's architecture and carry bit 30 in their numbers; each denied
//! call is denied under its x32 number too (`kexec_load`'s differs: [`X32_ONLY`]).
//!
//! What it costs tasks: tools that build sandboxes of their own from user namespaces
//! (rootless Podman or Buildah, bubblewrap, Chromium's sandbox: run headless browsers
//! with `--no-sandbox`) fail inside an attempt. The filter binds the attempt's processes
//! only: a process of the same uid outside it (another service run as the shell user)
//! is not filtered, so `shell_user` must be a user of its own.
//!
//! The filter is compiled by `seccompiler` once per process ([`get`]) and installed in
//! the child between fork and exec ([`SyscallFilter::install`]: two syscalls, nothing
//! allocated).

use std::collections::BTreeMap;
use std::io;
use std::sync::LazyLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The two compiled programs: the deny list (EPERM) and `clone3` (ENOSYS). Two, because
/// one seccompiler filter has one action for every call it matches; the kernel runs both.
#[derive(Debug)]
pub struct SyscallFilter {
    deny: BpfProgram,
    no_clone3: BpfProgram,
}

/// Refused whatever their arguments.
const DENIED: &[libc::c_long] = &[
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_syslog,
    libc::SYS_quotactl,
    libc::SYS_quotactl_fd,
    libc::SYS_open_by_handle_at,
    SYS_OPEN_TREE_ATTR,
];

/// `open_tree_attr` (Linux 6.15; one number on every architecture since 424), which
/// `libc` does not name yet.
const SYS_OPEN_TREE_ATTR: libc::c_long = 467;

/// x32 numbers of denied calls that are not their x86_64 number with bit 30 set (the
/// x32 table gives calls with differing structs numbers from 512): `kexec_load`.
const X32_ONLY: &[i64] = &[0x4000_0000 | 528];

/// The numbers one call has: its own, and on x86_64 its x32 number too (`c_long` is
/// seccompiler's i64 on every architecture it supports).
fn numbers(own: libc::c_long) -> Vec<i64> {
    if cfg!(target_arch = "x86_64") {
        const X32_SYSCALL_BIT: i64 = 0x4000_0000;
        vec![own, own | X32_SYSCALL_BIT]
    } else {
        vec![own]
    }
}

/// Why no filter could be built (an architecture seccompiler does not know).
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot build the shell attempts' syscall filter for {arch}: {reason}")]
pub struct BuildError {
    arch: &'static str,
    reason: String,
}

impl SyscallFilter {
    fn build() -> Result<SyscallFilter, BuildError> {
        let arch = std::env::consts::ARCH;
        let fail = |reason: String| BuildError { arch, reason };
        let target = TargetArch::try_from(arch).map_err(|e| fail(e.to_string()))?;
        let compile = |rules: BTreeMap<i64, Vec<SeccompRule>>, errno: i32| {
            let filter = SeccompFilter::new(
                rules,
                SeccompAction::Allow,
                SeccompAction::Errno(errno as u32),
                target,
            )
            .map_err(|e| fail(e.to_string()))?;
            BpfProgram::try_from(filter).map_err(|e| fail(e.to_string()))
        };
        let x32_only = X32_ONLY.iter().filter(|_| cfg!(target_arch = "x86_64"));
        let mut deny: BTreeMap<i64, Vec<SeccompRule>> = DENIED
            .iter()
            .flat_map(|c| numbers(*c))
            .chain(x32_only.copied())
            .map(|n| (n, Vec::new()))
            .collect();
        let new_user = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(libc::CLONE_NEWUSER as u64),
            libc::CLONE_NEWUSER as u64,
        )
        .and_then(|c| SeccompRule::new(vec![c]))
        .map_err(|e| fail(e.to_string()))?;
        for n in numbers(libc::SYS_clone) {
            deny.insert(n, vec![new_user.clone()]);
        }
        let clone3 = numbers(libc::SYS_clone3)
            .into_iter()
            .map(|n| (n, Vec::new()))
            .collect();
        Ok(SyscallFilter {
            deny: compile(deny, libc::EPERM)?,
            no_clone3: compile(clone3, libc::ENOSYS)?,
        })
    }

    /// Install both programs on the calling thread (sets `PR_SET_NO_NEW_PRIVS`, which
    /// the kernel requires of an unprivileged caller). Only syscalls: safe between fork
    /// and exec.
    pub fn install(&self) -> io::Result<()> {
        for program in [&self.deny, &self.no_clone3] {
            if seccompiler::apply_filter(program).is_err() {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

static FILTER: LazyLock<Result<SyscallFilter, BuildError>> = LazyLock::new(SyscallFilter::build);

/// This process's filter, compiled on first use (call it before a fork, never after).
pub fn get() -> Result<&'static SyscallFilter, BuildError> {
    FILTER.as_ref().map_err(Clone::clone)
}

/// Whether this kernel accepts the filter: runs `/bin/true` under it and says why not
/// (a kernel without `CONFIG_SECCOMP_FILTER`).
pub fn probe() -> io::Result<()> {
    let filter = get().map_err(io::Error::other)?;
    // SAFETY: `install` makes two syscalls and allocates nothing.
    unsafe { super::sandbox::probe_with(move || filter.install()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a forked child (the test harness's own threads stay unfiltered): install the
    /// filter, then make `call`; the child exits with the errno it got (0 for success).
    fn errno_of(call: impl Fn() -> libc::c_long) -> i32 {
        errno_in_child(Some(get().unwrap()), call)
    }

    /// The errno `call` gets under the filter, after checking that it gets another one
    /// without (where the kernel itself refuses it the same way, the filter's refusal
    /// could not be told apart: then it says so and returns the filtered errno anyway).
    fn refused(call: impl Fn() -> libc::c_long) -> i32 {
        let (with, without) = (errno_of(&call), errno_in_child(None, &call));
        if with == without {
            println!("the kernel itself answers {without} here: not a test of the filter");
        }
        with
    }

    fn errno_in_child(filter: Option<&SyscallFilter>, call: impl Fn() -> libc::c_long) -> i32 {
        // SAFETY: the child makes only syscalls and exits with _exit.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0, "fork failed");
            if pid == 0 {
                if filter.is_some_and(|f| f.install().is_err()) {
                    libc::_exit(200);
                }
                let rc = call();
                libc::_exit(if rc < 0 { *libc::__errno_location() } else { 0 });
            }
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            assert!(libc::WIFEXITED(status), "the child died: {status}");
            libc::WEXITSTATUS(status)
        }
    }

    #[test]
    fn new_user_namespaces_keyrings_and_io_uring_are_refused_and_the_rest_allowed() {
        // SAFETY (each closure): raw syscalls with valid or null arguments.
        let unshare_user = || unsafe { libc::unshare(libc::CLONE_NEWUSER) as libc::c_long };
        assert_eq!(refused(unshare_user), libc::EPERM);
        let keyctl =
            || unsafe { libc::syscall(libc::SYS_keyctl, libc::KEYCTL_GET_KEYRING_ID, -3i32, 0) };
        assert_eq!(refused(keyctl), libc::EPERM);
        let uring =
            || unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, std::ptr::null_mut::<u8>()) };
        assert_eq!(refused(uring), libc::EPERM);
        let clone3 =
            || unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null_mut::<u8>(), 0usize) };
        assert_eq!(refused(clone3), libc::ENOSYS);
        // clone with CLONE_NEWUSER is refused; a plain fork through clone is not.
        let clone_user = || unsafe {
            let rc = libc::syscall(
                libc::SYS_clone,
                (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong,
                0,
                0,
                0,
                0,
            );
            if rc == 0 {
                libc::_exit(0);
            }
            rc
        };
        assert_eq!(refused(clone_user), libc::EPERM);
        let fork = || unsafe {
            let rc = libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0, 0, 0, 0);
            if rc == 0 {
                libc::_exit(0);
            }
            rc
        };
        assert_eq!(errno_of(fork), 0);
        let getpid = || unsafe { libc::getpid() as libc::c_long };
        assert_eq!(errno_of(getpid), 0);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn an_x32_number_is_refused_like_its_x86_64_one() {
        // SAFETY: a raw syscall; its x32 number is refused before the kernel reads it.
        let x32_unshare =
            || unsafe { libc::syscall(libc::SYS_unshare | 0x4000_0000, libc::CLONE_NEWUSER) };
        assert_eq!(refused(x32_unshare), libc::EPERM);
    }

    #[test]
    fn this_kernel_runs_a_process_under_the_filter() {
        probe().unwrap();
    }
}

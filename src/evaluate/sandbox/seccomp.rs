//! The system-call filter a sandboxed program runs under: no new process (threads still work),
//! no debugging or reading another process's memory, no namespace, mount or kernel-wide
//! change, no keyring, BPF, io_uring or handle-based open (ways past the other walls).

use anyhow::{bail, Result};

/// Calls refused with EPERM beyond the process-creating ones.
const REFUSED: &[libc::c_long] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kcmp,
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_getfd,
    libc::SYS_pidfd_send_signal,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_syslog,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_sethostname,
    libc::SYS_setdomainname,
    libc::SYS_vhangup,
];

/// The filter: `fork`, `vfork` and a `clone` that is not a thread fail with EPERM, as does
/// every call in [`REFUSED`]; `clone3`, whose flags a filter cannot read, fails with ENOSYS,
/// on which glibc starts threads with `clone` instead. Another ABI than the native one
/// (i386's `int 0x80`, x32) is refused whole: its numbers differ.
pub fn filter() -> Result<Vec<libc::sock_filter>> {
    use libc::{BPF_ABS, BPF_JEQ, BPF_JGE, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_RET, BPF_W};
    // The `AUDIT_ARCH_*` of the native system-call table, and its calls that only fork.
    #[cfg(target_arch = "x86_64")]
    const NATIVE: Option<(u32, &[libc::c_long])> =
        Some((0xc000_003e, &[libc::SYS_fork, libc::SYS_vfork]));
    #[cfg(target_arch = "aarch64")]
    const NATIVE: Option<(u32, &[libc::c_long])> = Some((0xc000_00b7, &[]));
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    const NATIVE: Option<(u32, &[libc::c_long])> = None;
    let Some((arch, forks)) = NATIVE else {
        bail!(
            "HumanEval's sandbox knows the system calls of x86_64 and aarch64, not {}",
            std::env::consts::ARCH
        );
    };
    let op = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    // Offsets into `seccomp_data`: the call's number, its ABI, the low half of its first
    // argument (both architectures are little-endian).
    let load = |offset: u32| op(BPF_LD | BPF_W | BPF_ABS, offset, 0, 0);
    let ret = |action: u32| op(BPF_RET | BPF_K, action, 0, 0);
    let when = |nr: libc::c_long, action: u32| {
        [op(BPF_JMP | BPF_JEQ | BPF_K, nr as u32, 0, 1), ret(action)]
    };
    let allow = libc::SECCOMP_RET_ALLOW;
    let deny = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    let mut filter = vec![
        load(4),
        op(BPF_JMP | BPF_JEQ | BPF_K, arch, 1, 0),
        ret(deny),
        load(0),
        op(BPF_JMP | BPF_JGE | BPF_K, 0x4000_0000, 0, 1),
        ret(deny),
    ];
    filter.extend(when(
        libc::SYS_clone3,
        libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
    ));
    for &nr in forks.iter().chain(REFUSED) {
        filter.extend(when(nr, deny));
    }
    // Last, as it replaces the call's number with its first argument.
    filter.extend([
        op(BPF_JMP | BPF_JEQ | BPF_K, libc::SYS_clone as u32, 1, 0),
        ret(allow),
        load(16),
        op(BPF_JMP | BPF_JSET | BPF_K, libc::CLONE_THREAD as u32, 0, 1),
        ret(allow),
        ret(deny),
    ]);
    Ok(filter)
}

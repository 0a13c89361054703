"""A seccomp filter (classic BPF, built here without libseccomp) that bwrap installs on sandboxed code.

Without it, code running as an unprivileged uid could still create its own user and mount namespaces
and mount a tmpfs of unlimited size there (memory that no rlimit counts). The filter refuses with EPERM
every syscall that creates or enters a namespace or mounts; memory that no rlimit counts and that lives
as long as the sandbox (SysV shared memory and message queues, memfd files, which `fallocate` grows
past RLIMIT_FSIZE); `setsid`, whose new session would get a scheduling group (autogroup) of its own, as
much CPU as a whole neighbouring sandbox; and a few rarely needed kernel interfaces (keyrings, bpf,
userfaultfd, perf events, ptrace, io_uring). clone3 answers ENOSYS so that libc falls back to clone,
whose namespace flags are then checked. Syscalls of another ABI (i386, x32) kill the process.
"""

from __future__ import annotations

import errno
import platform
import struct

# classic BPF opcodes and seccomp return values (linux/filter.h, linux/seccomp.h)
LOAD = 0x20  # BPF_LD | BPF_W | BPF_ABS
JEQ, JGE, JSET = 0x15, 0x35, 0x45  # BPF_JMP | BPF_JEQ / BPF_JGE / BPF_JSET, constant operand
RET = 0x06  # BPF_RET | BPF_K
ALLOW, KILL_PROCESS, ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
NR, ARCH, ARG0 = 0, 4, 16  # offsets in struct seccomp_data
X32_BIT = 0x40000000
NAMESPACE_FLAGS = 0x7E020000  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET

# (audit arch, syscall numbers) from linux/audit.h and the arch's unistd headers
ARCHES = {
    "x86_64": (0xC000003E, {
        "unshare": 272, "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
        "mount_setattr": 442, "add_key": 248, "request_key": 249, "keyctl": 250, "bpf": 321,
        "userfaultfd": 323, "perf_event_open": 298, "ptrace": 101, "io_uring_setup": 425,
        "setsid": 112, "shmget": 29, "msgget": 68, "memfd_create": 319, "clone": 56, "clone3": 435}),
    "aarch64": (0xC00000B7, {
        "unshare": 97, "setns": 268, "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51,
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
        "mount_setattr": 442, "add_key": 217, "request_key": 218, "keyctl": 219, "bpf": 280,
        "userfaultfd": 282, "perf_event_open": 241, "ptrace": 117, "io_uring_setup": 425,
        "setsid": 157, "shmget": 194, "msgget": 186, "memfd_create": 279, "clone": 220, "clone3": 435}),
}


def _op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def namespace_filter(machine: str | None = None) -> bytes:
    """The filter for `machine` (default: this one) as raw `struct sock_filter`s, for `bwrap --seccomp`.
    Raises ValueError for an architecture without a syscall table here."""
    machine = machine or platform.machine()
    if machine not in ARCHES:
        raise ValueError(f"no seccomp syscall table for {machine!r}; supported: {', '.join(ARCHES)}")
    audit_arch, numbers = ARCHES[machine]
    prog = [_op(LOAD, ARCH), _op(JEQ, audit_arch, jt=1), _op(RET, KILL_PROCESS), _op(LOAD, NR)]
    if machine == "x86_64":
        prog += [_op(JGE, X32_BIT, jf=1), _op(RET, KILL_PROCESS)]
    denied = {name: nr for name, nr in numbers.items() if name not in ("clone", "clone3")}
    for nr in denied.values():
        prog += [_op(JEQ, nr, jf=1), _op(RET, ERRNO | errno.EPERM)]
    prog += [_op(JEQ, numbers["clone3"], jf=1), _op(RET, ERRNO | errno.ENOSYS)]
    prog += [_op(JEQ, numbers["clone"], jf=3), _op(LOAD, ARG0), _op(JSET, NAMESPACE_FLAGS, jf=1),
             _op(RET, ERRNO | errno.EPERM), _op(RET, ALLOW)]
    return b"".join(prog)

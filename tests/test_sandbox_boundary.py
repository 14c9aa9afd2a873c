"""Nothing crosses between a sandbox and the host, or from one sandbox to the next, and nothing a completion
does breaks the trainer's scoring of the others."""

import json
import os
import socket
import tempfile
import time
from pathlib import Path

import pytest

from reward_fns.code import code_reward, judge
from reward_fns.sandbox import Limits, remove_tree, run_python

QUICK = Limits(timeout_s=5, cpu_s=5)
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
ADD = "def add(a, b):\n    return a + b\n"


def sandbox_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("svf_rl_sandbox_*")}


def test_a_deep_tree_of_directories_is_removed_without_recursion(tmp_path):
    root = tmp_path / "deep"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY)
    for depth in range(3000):  # past PATH_MAX and past the interpreter's recursion limit
        os.mkdir("d", dir_fd=fd)
        if depth % 500 == 0:
            os.close(os.open("f", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
            os.symlink(str(tmp_path), "link", dir_fd=fd)  # never followed
        inner = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = inner
    os.close(fd)
    (tmp_path / "outside.txt").write_text("kept")
    remove_tree(str(root))
    assert not root.exists() and (tmp_path / "outside.txt").read_text() == "kept"
    remove_tree(str(root))  # gone already: nothing to do, nothing raised


NESTING = "import os\nfor _ in range(5000):\n    os.mkdir('d')\n    os.chdir('d')\n" + ADD


def test_a_completion_that_nests_directories_scores_zero_and_the_others_keep_their_scores():
    before = sandbox_dirs()
    scores = code_reward("all", QUICK)(None, [ADD, NESTING, ADD, ADD], tests=[ADD_TESTS] * 4)
    assert scores == [1.0, 0.0, 1.0, 1.0]
    assert sandbox_dirs() <= before  # nothing left behind


def test_the_working_directory_is_bounded_as_a_whole():
    program = ("import os\nwritten = 0\ntry:\n    for i in range(40):\n"
               "        with open(f'f{i}', 'wb') as f:\n            f.write(b'x' * (4 << 20))\n"
               "        written += 4 << 20\nexcept OSError as err:\n    print('full', err.errno)\nprint(written)\n"
               "made = 0\ntry:\n    for i in range(100000):\n        os.mkdir(f'd{i}')\n        made += 1\n"
               "except OSError as err:\n    print('inodes', err.errno)\nprint(made)\n")
    result = run_python(program, limits=Limits(timeout_s=20, cpu_s=20, disk_bytes=16 << 20, inodes=256))
    lines = result.stdout.split()
    assert "full" in lines and int(lines[lines.index("full") + 2]) <= 16 << 20, result.stdout + result.stderr
    assert "inodes" in lines and int(lines[-1]) < 256


def test_system_v_ipc_and_keyrings_are_refused():
    program = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
               "print(libc.shmget(0x5F17, 4096, 0o1666), ctypes.get_errno())\n"
               "print(libc.msgget(0x5F17, 0o1666), ctypes.get_errno())\n"
               "print(libc.semget(0x5F17, 1, 0o1666), ctypes.get_errno())\n"
               "for ring in (-3, -4):  # the session and user keyrings\n"
               "    print(libc.syscall(248, b'user', b'svf_rl_probe', b'x', 1, ring), ctypes.get_errno())\n")
    keys = Path("/proc/keys").read_text() if Path("/proc/keys").exists() else ""
    result = run_python(program, limits=QUICK)
    assert result.ok, result.stderr
    assert result.stdout.split() == ["-1", "1"] * 5  # EPERM, each
    assert "5f17" not in Path("/proc/sysvipc/shm").read_text().lower()
    if keys:
        assert Path("/proc/keys").read_text().count("svf_rl_probe") == keys.count("svf_rl_probe")


def test_unix_sockets_on_the_host_are_unreachable_and_proc_shows_only_the_sandbox(tmp_path):
    path = str(tmp_path / "trainer.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen()
        os.chmod(tmp_path, 0o777)
        os.chmod(path, 0o777)
        listener.settimeout(0.5)
        program = (f"import os, socket\n"
                   f"try:\n    socket.socket(socket.AF_UNIX).connect({path!r})\n    print('connected')\n"
                   f"except OSError as err:\n    print('refused', err.errno)\n"
                   f"try:\n    socket.socketpair()\n    print('pair')\nexcept OSError as err:\n"
                   f"    print('no pair', err.errno)\n"
                   f"print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n")
        result = run_python(program, limits=QUICK)
        with pytest.raises(socket.timeout):
            listener.accept()
    assert result.ok, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("refused") and lines[1].startswith("no pair"), result.stdout
    assert json.loads(lines[2]) == [1]  # the program itself, pid 1 of its namespace


def test_nothing_a_completion_leaves_reaches_the_next():
    key = f"svf_rl_guess_{os.getpid()}_{time.monotonic_ns()}"
    leave = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
             f"libc.syscall(248, b'user', b'{key}', b'41', 2, -4)\n"
             "libc.shmget(0x5F18, 4096, 0o1666)\n"
             "for path in ('/dev/shm/svf_rl_guess', '/tmp/svf_rl_guess', 'guess'):\n"
             "    try:\n        open(path, 'w').write('41')\n    except OSError:\n        pass\n")
    look = ("import os\nprint([os.path.exists(p) for p in ('/dev/shm/svf_rl_guess', '/tmp/svf_rl_guess', 'guess')])\n")
    run_python(leave, limits=QUICK)
    result = run_python(look, limits=QUICK)
    assert result.stdout.strip() == "[False, False, False]", result.stdout + result.stderr
    assert "5f18" not in Path("/proc/sysvipc/shm").read_text().lower()
    if Path("/proc/keys").exists():
        assert key not in Path("/proc/keys").read_text()


def test_a_candidate_that_raises_stop_iteration_fails_tests_that_iterate():
    tests = ["assert all(map(lambda x: double(x) == 2 * x, [1, 2, 3]))",
             "assert [y for _, y in zip([1], map(double, [4]))] == [8]"]
    stop = "def double(x):\n    raise StopIteration\n"
    honest = "def double(x):\n    return 2 * x\n"
    assert code_reward("fraction", QUICK)(None, [stop, honest], tests=[tests, tests]) == [0.0, 1.0]


@pytest.mark.parametrize("setup, test, rigged", [
    ("from math import comb\n", "assert pairs(5) == comb(5, 2)", "def comb(n, k):\n    return 0\n"),
    ("import math as m\n", "assert pairs(5) == m.comb(5, 2)", "class m:\n    comb = staticmethod(lambda n, k: 0)\n"),
    ("half = lambda n: n * (n - 1) // 2\n", "assert pairs(5) == half(5)", "half = lambda n: 0\n"),
    ("TABLE = [0, 0, 1, 3, 6, 10]\nlookup = TABLE.__getitem__\n", "assert pairs(5) == lookup(5)",
     "def lookup(i):\n    return 0\n"),
])
def test_every_name_the_rows_setup_binds_is_the_tests_own(setup, test, rigged):
    wrong = rigged + "def pairs(n):\n    return 0\n"
    right = "def pairs(n):\n    return n * (n - 1) // 2\n"
    reward = code_reward("all", QUICK)
    assert reward(None, [wrong, right], tests=[[test]] * 2, code_prefix=[setup] * 2) == [0.0, 1.0]


def test_a_candidate_that_stalls_the_judge_scores_zero_not_none():
    # Integers that share one hash: the test's set() of them takes the judge quadratic time in one C call,
    # past its alarm and its CPU limit.
    stall = "def answer():\n    return [k * (2**61 - 1) for k in range(100000)]\n"
    limits = Limits(timeout_s=3, cpu_s=3)
    start = time.monotonic()
    assert judge(stall, ["assert set(answer()) == {1}"], limits) == 0
    assert time.monotonic() - start < 30


def test_memory_is_bounded_for_the_sandbox_as_a_whole():
    from reward_fns.sandbox import _make_cgroups, _remove_cgroups

    probe = _make_cgroups(Limits(), "svf_rl_sandbox_probe")
    _remove_cgroups(probe)
    if not probe:
        pytest.skip("no cgroup can be made here: memory is bounded per process only")
    # Six processes of 300 MB each: every one is within the per-process limit, together they are not.
    program = ("import os, time\nchildren = []\nfor _ in range(6):\n    pid = os.fork()\n    if pid == 0:\n"
               "        block = bytearray(300 << 20)\n        block[::4096] = b'x' * len(block[::4096])\n"
               "        time.sleep(2)\n        os._exit(0)\n    children.append(pid)\n"
               "print(sum(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0 for pid in children))\n")
    result = run_python(program, limits=Limits(timeout_s=30, cpu_s=30, total_memory_bytes=1 << 30))
    assert result.stdout.strip().isdigit() and int(result.stdout) <= 3, result.stdout + result.stderr
    alone = run_python(program, limits=Limits(timeout_s=30, cpu_s=30, total_memory_bytes=4 << 30))
    assert alone.stdout.strip() == "6", alone.stdout + alone.stderr  # the program itself works

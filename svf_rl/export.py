"""Checkpoint → expert file, without loading the model: z and the run's metadata are all it needs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from .expert import Expert, save_expert
from .run_files import checkpoint_dirs, write_atomic

RUN_INFO = "run.json"  # base model, fingerprint, targets and task of a run, written when it starts


def write_run_info(run_dir: Path, base_model: str, base_fingerprint: str, targets: str, task: str,
                   task_args: dict | None = None) -> None:
    """Record what `export_checkpoint` needs besides z, so any checkpoint of the run can become an expert, and
    what a resumed run must match."""
    info = {"base_model": base_model, "base_fingerprint": base_fingerprint, "targets": targets, "task": task,
            "task_args": task_args or {}}
    write_atomic(Path(run_dir) / RUN_INFO, json.dumps(info))


def read_run_info(run_dir: Path) -> dict:
    """run.json of a run directory that holds checkpoints; a missing or unreadable one is a one-line error."""
    path = Path(run_dir) / RUN_INFO
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{run_dir} holds checkpoints but no readable {RUN_INFO} ({type(err).__name__}), "
                                f"so they cannot be checked against this run; give another output_dir, or "
                                f"resume=false to start afresh there") from None
    if not isinstance(info, dict):
        raise FileNotFoundError(f"{path} is not an svf-rl run record")
    return info


def export_checkpoint(checkpoint: str | Path, output: str | Path) -> Path:
    """Write the z of a checkpoint (or of a run directory's latest checkpoint) as an expert file."""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    if checkpoint.name.startswith("step_"):
        run_dir = checkpoint.parent.parent
    else:
        run_dir, found = checkpoint, checkpoint_dirs(checkpoint)
        if not found:
            raise FileNotFoundError(f"{checkpoint} holds no checkpoints/step_* directory")
        checkpoint = found[-1]
    state_file = checkpoint / "custom_checkpoint_0.pkl"
    if not state_file.exists():
        raise FileNotFoundError(f"{checkpoint} has no run state ({state_file.name})")
    if not (run_dir / RUN_INFO).exists():
        raise FileNotFoundError(f"{run_dir} has no {RUN_INFO}; is it an svf-rl run directory?")
    state = torch.load(state_file, weights_only=True)
    info = json.loads((run_dir / RUN_INFO).read_text())
    config_file = run_dir / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.exists() else {}
    expert = Expert(state["z"], info["base_model"], info["base_fingerprint"], info["targets"], info["task"],
                    config, {"step": state["step"]})
    return save_expert(expert, output)

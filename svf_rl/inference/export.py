"""Checkpoint → expert file, without loading the model: z and the run's metadata are all it needs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from svf_rl.inference.expert import Expert, check_vectors, save_expert
from svf_rl.inputs import check_output, read_torch_file
from svf_rl.run_files import checkpoint_dirs, environment, write_atomic

RUN_INFO = "run.json"  # base model, fingerprint, targets and task of a run, written when it starts


def write_run_info(run_dir: Path, base_model: str, base_fingerprint: str, targets: str, task: str,
                   task_args: dict | None = None, policy: str = "svf", policy_args: dict | None = None) -> None:
    """Record what `export_checkpoint` needs besides z, so any checkpoint of the run can become an expert, and
    what a resumed run must match; and the environment it ran in."""
    info = {"base_model": base_model, "base_fingerprint": base_fingerprint, "targets": targets, "task": task,
            "task_args": task_args or {}, "policy": policy, "policy_args": policy_args or {},
            "environment": environment()}
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


def _export_info(path: Path) -> dict:
    """run.json as export needs it, every failure one line."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not readable JSON ({type(err).__name__}); is it an svf-rl run record?") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path} is not an svf-rl run record (a JSON object)")
    missing = [key for key in ("base_model", "base_fingerprint", "targets", "task")
               if not isinstance(info.get(key), str)]
    if missing:
        raise ValueError(f"{path} records no {', '.join(missing)}; is it an svf-rl run record?")
    return info


def export_checkpoint(checkpoint: str | Path, output: str | Path, overwrite: bool = True) -> Path:
    """Write the z of a checkpoint (or of a run directory's latest checkpoint) as an expert file. The output
    replaces a file only with `overwrite`, and never one the checkpoint is read from; the checkpoint's state is
    unpickled as tensors only."""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    if not checkpoint.is_dir():
        raise ValueError(f"{checkpoint} is a file; give a run directory or one of its checkpoints/step_* "
                         f"directories")
    if checkpoint.name.startswith("step_"):
        run_dir = checkpoint.parent.parent
    else:
        run_dir, found = checkpoint, checkpoint_dirs(checkpoint)
        if not found:
            raise FileNotFoundError(f"{checkpoint} holds no checkpoints/step_* directory")
        checkpoint = found[-1]
    state_file, info_file = checkpoint / "custom_checkpoint_0.pkl", run_dir / RUN_INFO
    config_file = run_dir / "config.yaml"
    if not state_file.exists():
        raise FileNotFoundError(f"{checkpoint} has no run state ({state_file.name})")
    if not info_file.exists():
        raise FileNotFoundError(f"{run_dir} has no {RUN_INFO}; is it an svf-rl run directory?")
    output = check_output(output, [state_file, info_file, config_file], overwrite)
    info = _export_info(info_file)
    state = read_torch_file(state_file, "checkpoint run state")
    if isinstance(state, dict) and "adapter" in state:
        raise ValueError(f"{checkpoint} is a checkpoint of a {info.get('policy', 'PEFT')} adapter, not of z; its run "
                         f"writes PEFT adapter directories (adapter/, adapter_best/) itself")
    z = state.get("z") if isinstance(state, dict) else None
    if not isinstance(z, dict) or not all(isinstance(v, torch.Tensor) for v in z.values()):
        raise ValueError(f"{state_file} holds no z vectors (module name -> tensor); is it an svf-rl checkpoint?")
    z = {name: v.detach().float() for name, v in z.items()}
    check_vectors(z, str(state_file))  # named after the checkpoint, not the file that would have been written
    try:
        config = yaml.safe_load(config_file.read_text()) if config_file.exists() else {}
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ValueError(f"{config_file} is not readable YAML ({type(err).__name__})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} is not an svf-rl run config (a YAML mapping)")
    expert = Expert(z, info["base_model"], info["base_fingerprint"], info["targets"], info["task"], config,
                    {"step": state.get("step")})
    return save_expert(expert, output)

"""Checkpoint → expert file, without loading the model: z and the run's metadata are all it needs."""

from __future__ import annotations

from pathlib import Path

import torch

from .expert import load_expert, save_expert
from .run_files import checkpoint_dirs


def export_checkpoint(checkpoint: str | Path, output: str | Path) -> Path:
    """Write the z of a checkpoint (or a run directory's latest one) as an expert file."""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    run_dir = checkpoint
    if not checkpoint.name.startswith("step_"):
        found = checkpoint_dirs(checkpoint)
        if not found:
            raise FileNotFoundError(f"{checkpoint} holds no checkpoints/step_* directory")
        checkpoint = found[-1]
    else:
        run_dir = checkpoint.parent.parent
    states = sorted(checkpoint.glob("custom_checkpoint_*.pkl"))
    if not states:
        raise FileNotFoundError(f"{checkpoint} has no run state (custom_checkpoint_0.pkl)")
    state = torch.load(states[0], weights_only=True)
    template = run_dir / "expert_best.safetensors"
    if not template.exists():
        raise FileNotFoundError(f"{run_dir} has no expert_best.safetensors to take the base model metadata from")
    expert = load_expert(template)
    expert.vectors = state["z"]
    expert.scores = {"step": state["step"]}
    return save_expert(expert, output)

"""What a sequence router can read: how far apart the tasks of `task=mixed` are in the base model's prompt
features, with and without centring.

For each feature (the mean of the final hidden states over the prompt's tokens, the last prompt token's final
state, the mean of a middle layer's) at unit length, uncentred or less its mean over 64 training prompts (what
`routing=sequence` does): the nearest-task-centroid accuracy on 300 test prompts (centroids from 300 training
prompts), the largest distance between two tasks' centroids, and the mean distance of a prompt to its own
task's centroid. Prints a Markdown table.

    python benchmarks/prompt_features.py
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from svf_rl.base_model import EMBEDDED_MODEL, load_base_model
from svf_rl.engines.hf import chat_ids, left_pad
from svf_rl.loop.train import CALIBRATION_PROMPTS, HELDOUT_SEED
from svf_rl.task import load_task


@torch.no_grad()
def features(model, tokenizer, task, rows: list[dict]) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {"mean of the final states": [], "last token's final state": [],
                                          "mean of a middle layer's states": []}
    for start in range(0, len(rows), 32):
        ids, mask = left_pad([chat_ids(tokenizer, task.prompt(r)) for r in rows[start:start + 32]],
                             tokenizer.pad_token_id)
        hidden = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       output_hidden_states=True).hidden_states
        weights = mask[..., None].float()
        for key, states in zip(out, (hidden[-1], None, hidden[len(hidden) // 2]), strict=True):
            out[key].append(hidden[-1][:, -1] if states is None else (states * weights).sum(1) / weights.sum(1))
    return {k: torch.cat(v) for k, v in out.items()}


def main() -> None:
    task = load_task("mixed")
    train, test = task.rows("train", 2000, 0), task.rows("test", 300, HELDOUT_SEED)
    model, tokenizer = load_base_model(EMBEDDED_MODEL)
    model.eval()
    calibration = features(model, tokenizer, task, random.Random(0).sample(train, CALIBRATION_PROMPTS))
    known, asked = features(model, tokenizer, task, train[:300]), features(model, tokenizer, task, test)
    known_tasks, asked_tasks = [r["source"] for r in train[:300]], [r["source"] for r in test]
    names = sorted(set(known_tasks))
    print("| feature | centred | nearest-centroid accuracy | largest distance between tasks | within a task |")
    print("|---|---|---:|---:|---:|")
    for kind in calibration:
        for centred in (False, True):
            centre = calibration[kind].mean(0) if centred else 0
            train_u, test_u = F.normalize(known[kind] - centre, dim=-1), F.normalize(asked[kind] - centre, dim=-1)
            members = [[i for i, t in enumerate(known_tasks) if t == name] for name in names]
            centroids = torch.stack([train_u[m].mean(0) for m in members])
            guess = (test_u @ centroids.T).argmax(-1).tolist()
            accuracy = sum(names[g] == t for g, t in zip(guess, asked_tasks, strict=True)) / len(asked_tasks)
            within = torch.stack([(train_u[m] - centroids[j]).norm(dim=-1).mean()
                                  for j, m in enumerate(members)]).mean()
            print(f"| {kind} | {'yes' if centred else 'no'} | {100 * accuracy:.1f}% | "
                  f"{torch.cdist(centroids, centroids).max():.2f} | {within:.2f} |")


if __name__ == "__main__":
    main()

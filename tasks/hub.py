"""Loading a split of a Hugging Face dataset, or the same schema from local JSONL files."""

from __future__ import annotations

import json
from pathlib import Path

from svf_rl.task import TaskError


def load_split(path: str, config: str | None, split: str, data_dir: str | None = None) -> list[dict]:
    """Rows of `split`: from `data_dir/{split}.jsonl` when given, else from the Hub (cached after first use)."""
    if data_dir is not None:
        file = Path(data_dir) / f"{split}.jsonl"
        if not file.is_file():
            raise TaskError(f"{file} not found; data_dir must hold one JSONL file per split in the {path} schema")
        return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    import datasets

    try:
        return list(datasets.load_dataset(path, config, split=split))
    except Exception as err:  # offline, missing cache, renamed dataset: one line that says what to do
        name = f"{path}" + (f" ({config})" if config else "")
        raise TaskError(f"cannot load dataset {name} split {split!r} ({type(err).__name__}); run "
                        f"datasets.load_dataset({path!r}, {config!r}) once with network to cache it, "
                        f"or pass task_args.data_dir=DIR holding {split}.jsonl in the same schema") from None

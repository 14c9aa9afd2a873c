"""Bad input to the commands that use experts: one line, exit 2, before any model loads, nothing lost.

Every case runs the real command line with the model loaders replaced by a trap, so a case that reached a
model would fail; files are small expert, Sakana and checkpoint files written here with realistic metadata.
"""

import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

import svf_rl.inference.adapt
import svf_rl.inference.evaluate
import svf_rl.inference.export
import svf_rl.inference.merge
import svf_rl.inference.sakana  # noqa: F401  (imported so that their loaders can be replaced)
from svf_rl.cli import main
from svf_rl.inference.expert import SIGMOID_RESCALED, Expert, load_expert, save_expert
from svf_rl.inputs import one_line

UP, DOWN = "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"
BASE = "org/base-model"  # a hub id: it passes the model check without a download
FINGERPRINT = "0123456789abcdef" * 2
GCD = ["reasoning_gym", {"dataset": "gcd", "config": {"min_value": 1, "max_value": 100}, "extract": "last_number"}]
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # escape codes and other control characters


class ModelOpened(Exception):
    """Raised by every model loader here: a case that gets this far did not check its input first."""


LOADERS = ("load_base_model", "load_model", "convert_embedded_model", "inference_engine")


@pytest.fixture(autouse=True)
def no_model(monkeypatch, tmp_path_factory):
    def trap(*args, **kwargs):
        raise ModelOpened(f"a model loader was called with {args}")

    for name, module in list(sys.modules.items()):
        if name.startswith("svf_rl") and module is not None:
            for loader in LOADERS:
                if hasattr(module, loader):
                    monkeypatch.setattr(module, loader, trap)
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer, transformers.AutoConfig,
                 transformers.PreTrainedModel):
        monkeypatch.setattr(auto, "from_pretrained", trap)
    monkeypatch.setenv("SVF_RL_CACHE", str(tmp_path_factory.mktemp("cache")))


def expert(task="arithmetic", task_args=None, fingerprint=FINGERPRINT, base=BASE, targets="mlp", vectors=None,
           **config) -> Expert:
    vectors = vectors or {UP: torch.linspace(0.5, 1.5, 8), DOWN: torch.linspace(0.9, 1.1, 6)}
    config = {"task": task, "task_args": {} if task_args is None else task_args, "max_new_tokens": 4, **config}
    return Expert(vectors, base, fingerprint, targets, task, config if task else {}, {"test_accuracy": 0.5})


def raw_expert(path, vectors, **metadata):
    save_file(vectors, path, metadata={**expert().metadata(), **metadata})


class Harmful:
    """A pickle that would run a command if loaded: the marker file it makes would show in the snapshot."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def sakana_state(n=2, size=6):
    return {f"learnable_params_module_list.{i}": torch.linspace(-1, 1, size).bfloat16() for i in range(n)}


def save_torch(path, value):
    torch.save(value, path)


def truncated(path, value):
    torch.save(value, path)
    path.write_bytes(path.read_bytes()[:200])


def checkpoint(root, state=None, run_info=None, config="lr: 0.002\n"):
    """A run directory as `svf-rl train` leaves it: run.json, config.yaml and one checkpoint's state."""
    step = root / "checkpoints" / "step_000002"
    step.mkdir(parents=True)
    info = {"base_model": BASE, "base_fingerprint": FINGERPRINT, "targets": "mlp", "task": "arithmetic",
            "task_args": {}}
    (root / "run.json").write_text(run_info if isinstance(run_info, str) else json.dumps(run_info or info))
    if config is not None:
        (root / "config.yaml").write_text(config)
    z = {UP: torch.ones(8), DOWN: torch.ones(6)}
    state = {"z": z, "step": 2} if state is None else state
    if callable(state):
        state(step / "custom_checkpoint_0.pkl")
    else:
        torch.save(state, step / "custom_checkpoint_0.pkl")


def classifier(labels):
    sources = {"a": ["arithmetic", {}], "gcd": GCD}
    return expert("task_classification", {"sources": {k: sources.get(k, ["arithmetic", {}]) for k in labels}},
                  train_size=50)


# Each file a case names, written only when a case names it. `{out}` and `{new}` are paths that do not exist.
BUILD = {
    "a": lambda p: save_expert(expert(), p / "a.safetensors"),
    "gcd": lambda p: save_expert(expert(*GCD), p / "gcd.safetensors"),
    "other_base": lambda p: save_expert(expert(fingerprint="f" * 32, base="org/other"), p / "otherbase.safetensors"),
    "other_targets": lambda p: save_expert(expert(targets="attn", vectors={"model.layers.0.self_attn.q_proj":
                                                                         torch.ones(4)}), p / "attn.safetensors"),
    "sigmoid": lambda p: save_expert(Expert(expert().vectors, BASE, FINGERPRINT, "mlp", "code",
                                            parametrisation=SIGMOID_RESCALED), p / "sakana.safetensors"),
    "no_base": lambda p: save_expert(expert(base=""), p / "nobase.safetensors"),
    "no_task": lambda p: save_expert(expert(task=""), p / "notask.safetensors"),
    "bad_budget": lambda p: save_expert(expert(max_new_tokens="lots"), p / "budget.safetensors"),
    "cls": lambda p: save_expert(classifier(["a", "gcd"]), p / "cls.safetensors"),
    "cls_partial": lambda p: save_expert(classifier(["a", "x"]), p / "cls_partial.safetensors"),
    "cls_other_base": lambda p: save_expert(Expert(**{**classifier(["a", "gcd"]).__dict__,
                                                      "base_fingerprint": "f" * 32}), p / "cls_other.safetensors"),
    "nan_expert": lambda p: raw_expert(p / "nan.safetensors", {UP: torch.tensor([1.0, float("nan")])}),
    "bad_meta": lambda p: raw_expert(p / "meta.safetensors", {UP: torch.ones(2)}, config="{oops"),
    "plain": lambda p: save_file({"w": torch.zeros(2)}, p / "plain.safetensors"),
    "empty": lambda p: (p / "empty.safetensors").write_bytes(b""),
    "text": lambda p: (p / "notes.txt").write_text("these are my notes\nnot an expert\n"),
    "dir": lambda p: ((p / "full").mkdir(), (p / "full" / "keep.txt").write_text("mine")),
    "emptydir": lambda p: (p / "emptydir").mkdir(),
    "afile": lambda p: (p / "afile").write_text("a file"),
    "old_json": lambda p: (p / "old.json").write_text('{"accuracy": 0.9}'),
    "old_st": lambda p: save_expert(expert(), p / "old.safetensors"),
    "default_eval": lambda p: (p / "eval_arithmetic_test.json").write_text('{"accuracy": 0.9}'),
    "default_adapt": lambda p: (p / "adapt_oracle.json").write_text('{"accuracy": 0.9}'),
    "hardlink": lambda p: (BUILD["a"](p), os.link(p / "a.safetensors", p / "alias.safetensors")),
    "symlink": lambda p: (BUILD["a"](p), os.symlink(p / "a.safetensors", p / "link.safetensors")),
    "model": lambda p: ((p / "model").mkdir(), (p / "model" / "config.json").write_text("{}")),
    "moved_base": lambda p: save_expert(expert(base="/home/someone/models/base"), p / "moved.safetensors"),
    "trained": lambda p: save_expert(expert(), p / "myrun" / "expert.safetensors"),
    "fifo": lambda p: os.mkfifo(p / "pipe"),
    "taskfile": lambda p: (p / "mytask.py").write_text("x = 1\n"),
    "notmodel": lambda p: (p / "notmodel").mkdir(),
    "llama": lambda p: ((p / "llama").mkdir(), (p / "llama" / "config.json").write_text(
        json.dumps({"num_hidden_layers": 1, "hidden_size": 6, "intermediate_size": 8}))),
    "alpha_list": lambda p: (p / "alpha_list.json").write_text("[0.5, 0.5]"),
    "alpha_scalar": lambda p: (p / "alpha_scalar.json").write_text(json.dumps({UP: 0.5, DOWN: 0.5})),
    "alpha_bad": lambda p: (p / "alpha_bad.json").write_text("{" + UP),
    "alpha_string": lambda p: (p / "alpha_string.json").write_text('"half"'),
    "alpha_unknown": lambda p: (p / "alpha_unknown.json").write_text(json.dumps({UP: [1, 0], "x": [1, 0]})),
    "alpha_nan": lambda p: (p / "alpha_nan.json").write_text(f'{{"{UP}": [NaN, 1], "{DOWN}": [1, 0]}}'),
    "alpha_count": lambda p: (p / "alpha_count.json").write_text(json.dumps({UP: [1], DOWN: [1]})),
    "alpha_words": lambda p: (p / "alpha_words.json").write_text(json.dumps({UP: ["a", "b"], DOWN: [1, 0]})),
    "alpha_bool": lambda p: (p / "alpha_bool.json").write_text(json.dumps([True, False])),
    "sakana": lambda p: save_torch(p / "policy_params.pt", sakana_state()),
    "sakana_nan": lambda p: save_torch(p / "nan.pt", {**sakana_state(), "learnable_params_module_list.1":
                                                      torch.tensor([1.0, float("nan"), 0.0])}),
    "sakana_inf": lambda p: save_torch(p / "inf.pt", {"learnable_params_module_list.0": torch.tensor([float("inf")])}),
    "sakana_2d": lambda p: save_torch(p / "2d.pt", {"learnable_params_module_list.0": torch.ones(2, 3)}),
    "sakana_int": lambda p: save_torch(p / "int.pt", {"learnable_params_module_list.0": torch.ones(3, dtype=int)}),
    "sakana_list": lambda p: save_torch(p / "list.pt", [torch.ones(3)]),
    "sakana_dict0": lambda p: save_torch(p / "dict0.pt", {}),
    "sakana_zero": lambda p: save_torch(p / "zero.pt", {"learnable_params_module_list.0": torch.ones(0)}),
    "sakana_gap": lambda p: save_torch(p / "gap.pt", {"learnable_params_module_list.1": torch.ones(3)}),
    "sakana_keys": lambda p: save_torch(p / "keys.pt", {"model.layers.0.mlp": torch.ones(3)}),
    "sakana_text": lambda p: (p / "policy.txt").write_text("learnable_params_module_list.0 = [1, 2]\n"),
    "sakana_harmful": lambda p: save_torch(p / "harmful.pt", {"learnable_params_module_list.0":
                                                              Harmful(p / "PWNED")}),
    "sakana_pickle": lambda p: (p / "pickle.pt").write_bytes(__import__("pickle").dumps(Harmful(p / "PWNED"))),
    "sakana_trunc": lambda p: truncated(p / "trunc.pt", sakana_state()),
    "sakana_empty": lambda p: (p / "empty.pt").write_bytes(b""),
    "sakana_escape": lambda p: (p / "bad\x1b[31mred\x1b[0m.pt").write_text("\x1b[2Jcleared"),
    "run": lambda p: checkpoint(p / "run"),
    "run_trunc": lambda p: checkpoint(p / "run_trunc", lambda f: truncated(f, {"z": {UP: torch.ones(8)}})),
    "run_harmful": lambda p: checkpoint(p / "run_harmful", {"z": Harmful(p / "PWNED"), "step": 2}),
    "run_text": lambda p: checkpoint(p / "run_text", lambda f: f.write_text("step 2\n")),
    "run_noinfo": lambda p: (checkpoint(p / "run_noinfo"), (p / "run_noinfo" / "run.json").unlink()),
    "run_badinfo": lambda p: checkpoint(p / "run_badinfo", run_info="{"),
    "run_listinfo": lambda p: checkpoint(p / "run_listinfo", run_info="[1]"),
    "run_keys": lambda p: checkpoint(p / "run_keys", run_info={"base_model": BASE}),
    "run_noz": lambda p: checkpoint(p / "run_noz", {"step": 2}),
    "run_zlist": lambda p: checkpoint(p / "run_zlist", {"z": [torch.ones(3)], "step": 2}),
    "run_nanz": lambda p: checkpoint(p / "run_nanz", {"z": {UP: torch.tensor([float("nan")])}, "step": 2}),
    "run_badyaml": lambda p: checkpoint(p / "run_badyaml", config="lr: [0.1\n  - : :"),
    "run_nostate": lambda p: (checkpoint(p / "run_nostate"),
                              (p / "run_nostate/checkpoints/step_000002/custom_checkpoint_0.pkl").unlink()),
    "run_empty": lambda p: (p / "run_empty").mkdir(),
}
STATE = "run/checkpoints/step_000002/custom_checkpoint_0.pkl"
# Paths of the files BUILD writes, by name.
FILES = {"a": "a.safetensors", "gcd": "gcd.safetensors", "other_base": "otherbase.safetensors",
         "other_targets": "attn.safetensors", "sigmoid": "sakana.safetensors", "no_base": "nobase.safetensors",
         "no_task": "notask.safetensors", "bad_budget": "budget.safetensors", "cls": "cls.safetensors",
         "cls_partial": "cls_partial.safetensors", "cls_other_base": "cls_other.safetensors",
         "nan_expert": "nan.safetensors", "bad_meta": "meta.safetensors", "plain": "plain.safetensors",
         "empty": "empty.safetensors", "text": "notes.txt", "dir": "full", "emptydir": "emptydir", "afile": "afile",
         "old_json": "old.json", "old_st": "old.safetensors", "default_eval": "eval_arithmetic_test.json",
         "default_adapt": "adapt_oracle.json", "hardlink": "alias.safetensors", "symlink": "link.safetensors",
         "model": "model", "notmodel": "notmodel", "llama": "llama",
         "moved_base": "moved.safetensors", "trained": "myrun",
         "fifo": "pipe", "taskfile": "mytask.py", "sakana": "policy_params.pt", "sakana_nan": "nan.pt",
         "sakana_inf": "inf.pt", "sakana_2d": "2d.pt", "sakana_int": "int.pt", "sakana_list": "list.pt",
         "sakana_dict0": "dict0.pt", "sakana_zero": "zero.pt", "sakana_gap": "gap.pt", "sakana_keys": "keys.pt",
         "sakana_text": "policy.txt", "sakana_harmful": "harmful.pt", "sakana_pickle": "pickle.pt",
         "sakana_trunc": "trunc.pt", "sakana_empty": "empty.pt", "sakana_escape": "bad\x1b[31mred\x1b[0m.pt"}
FILES.update({name: f"{name}.json" for name in BUILD if name.startswith("alpha_")})
FILES.update({name: name for name in BUILD if name.startswith("run")})


def C(argv: list[str], message: str, id: str, needs: tuple = ()):
    """A case: the arguments, a fragment its error line must hold, and files it needs that no argument names."""
    return pytest.param(argv, message, needs, id=id)

CASES = [
    # eval: numbers
    C(["eval", "{a}", "--size", "0"], "--size", id="eval-size-0"),
    C(["eval", "{a}", "--size", "-5"], "--size", id="eval-size-negative"),
    C(["eval", "{a}", "--samples", "-3"], "--samples", id="eval-samples-negative"),
    C(["eval", "{a}", "--max-new-tokens", "0"], "--max-new-tokens", id="eval-max-new-tokens-0"),
    C(["eval", "{a}", "--samples", "4", "--temperature", "0"], "--temperature", id="eval-temperature-0"),
    C(["eval", "{a}", "--samples", "4", "--temperature", "nan"], "--temperature", id="eval-temperature-nan"),
    C(["eval", "{a}", "--samples", "4", "--temperature", "inf"], "--temperature", id="eval-temperature-inf"),
    C(["eval", "{a}", "{gcd}", "--alpha", "1"], "2 experts", id="eval-alpha-count"),
    C(["eval", "{a}", "--alpha", "nan"], "finite", id="eval-alpha-nan"),
    C(["eval", "{a}", "{gcd}", "--alpha", "inf", "0"], "finite", id="eval-alpha-inf"),
    C(["eval", "--task", "arithmetic", "--model", "{model}", "--alpha", "1"], "expert", id="eval-alpha-no-experts"),
    C(["eval", "{a}", "--size", "ten"], "invalid int", id="eval-size-not-a-number"),
    C(["eval", "{a}", "--engine", "tgi"], "invalid choice", id="eval-unknown-engine"),
    C(["eval", "{a}", "--dtype", "fp8"], "invalid choice", id="eval-unknown-dtype"),
    # eval: experts
    C(["eval", "{a}", "{other_base}"], "fingerprint", id="eval-mixed-bases"),
    C(["eval", "{a}", "{other_targets}"], "targets", id="eval-mixed-targets"),
    C(["eval", "{new}"], "not found", id="eval-missing-expert"),
    C(["eval", "{dir}"], "directory", id="eval-directory-as-expert"),
    C(["eval", "{empty}"], "empty", id="eval-empty-expert"),
    C(["eval", "{text}"], "safetensors", id="eval-text-as-expert"),
    C(["eval", "{plain}"], "not an svf-rl expert", id="eval-foreign-safetensors"),
    C(["eval", "{nan_expert}"], "non-finite", id="eval-nan-expert"),
    C(["eval", "{no_base}"], "records no base model", id="eval-expert-without-base"),
    C(["eval", "{no_task}"], "give --task", id="eval-expert-without-task"),
    C(["eval", "{moved_base}"], "cannot be loaded here", id="eval-expert-base-on-another-machine"),
    C(["eval", "{trained}"], "did you mean", id="eval-run-directory-as-expert"),
    C(["eval", "{fifo}"], "not a regular file", id="eval-pipe-as-expert"),
    C(["eval", "--model", "{model}"], "give --task", id="eval-base-without-task"),
    # eval: task, split, model
    C(["eval", "{a}", "--task", "no_such_task"], "unknown task", id="eval-unknown-task"),
    C(["eval", "{a}", "--task", "no_such_module:Task"], "no_such_module", id="eval-task-module-missing"),
    C(["eval", "{a}", "--task", "{new}.py:Task"], "not found", id="eval-task-file-missing"),
    C(["eval", "{a}", "--task-args", "{oops"], "--task-args", id="eval-task-args-not-json"),
    C(["eval", "{a}", "--task-args", "[1, 2]"], "object", id="eval-task-args-list"),
    C(["eval", "{a}", "--task", "arithmetic", "--task-args", '{"colour": "red"}'], "rejected",
      id="eval-task-args-rejected"),
    C(["eval", "{a}", "--split", "dev"], "split", id="eval-unknown-split"),
    C(["eval", "{a}", "--model", "{new}/model"], "not found", id="eval-model-missing"),
    C(["eval", "{a}", "--model", "{notmodel}"], "config.json", id="eval-model-not-a-model-directory"),
    C(["eval", "{a}", "--model", "{text}"], "file", id="eval-model-is-a-file"),
    C(["eval", "{a}", "--model", "not a model!"], "hub id", id="eval-model-not-an-id"),
    C(["eval", "{a}", "--model", "embedded:gpt5"], "embedded", id="eval-model-unknown-embedded"),
    # eval: output
    C(["eval", "{a}", "--output", "{old_json}"], "--overwrite", id="eval-output-exists"),
    C(["eval", "{a}"], "--overwrite", id="eval-default-output-exists", needs=("default_eval",)),
    C(["eval", "{a}", "--output", "{a}", "--overwrite"], "input", id="eval-output-is-the-expert"),
    C(["eval", "{a}", "--output", "{dir}"], "directory", id="eval-output-is-a-directory"),
    C(["eval", "{a}", "--output", "{afile}/r.json"], "is a file", id="eval-output-under-a-file"),
    C(["eval", "{a}", "--output", "{fifo}", "--overwrite"], "not a regular file", id="eval-output-is-a-pipe"),
    C(["eval", "{a}", "--task", "{taskfile}:Mine", "--output", "{taskfile}", "--overwrite"], "input",
      id="eval-output-is-the-task-file"),
    # compose
    C(["compose", "{a}", "{gcd}", "-o", "{a}"], "input", id="compose-output-is-an-input"),
    C(["compose", "{a}", "{gcd}", "-o", "{gcd}", "--overwrite"], "input", id="compose-output-is-an-input-overwrite"),
    C(["compose", "{a}", "{gcd}", "-o", "{hardlink}", "--overwrite"], "input", id="compose-output-hard-link"),
    C(["compose", "{a}", "{gcd}", "-o", "{symlink}", "--overwrite"], "input", id="compose-output-symlink"),
    C(["compose", "{a}", "{gcd}", "-o", "{old_st}"], "--overwrite", id="compose-output-exists"),
    C(["compose", "{a}", "{gcd}", "-o", "{dir}"], "directory", id="compose-output-is-a-directory"),
    C(["compose", "{a}", "{gcd}", "-o", "{dir}", "--overwrite"], "directory", id="compose-output-directory-overwrite"),
    C(["compose", "{a}", "{gcd}", "-o", "{new}/"], "directory", id="compose-output-trailing-slash"),
    C(["compose", "{a}", "{gcd}", "-o", "{afile}/x.safetensors"], "is a file", id="compose-output-under-a-file"),
    C(["compose", "{a}", "{gcd}"], "required", id="compose-no-output"),
    C(["compose", "{a}", "{gcd}", "--alpha-file", "{alpha_list}", "-o", "{alpha_list}", "--overwrite"], "input",
      id="compose-output-is-the-alpha-file"),
    C(["compose", "{a}", "{gcd}", "--alpha-file", "{fifo}", "-o", "{out}"], "not a regular file",
      id="compose-alpha-file-is-a-pipe"),
    C(["compose", "{a}", "{gcd}", "--alpha", "1", "-o", "{out}"], "2 experts", id="compose-alpha-count"),
    C(["compose", "{a}", "{gcd}", "--alpha", "nan", "1", "-o", "{out}"], "finite", id="compose-alpha-nan"),
    C(["compose", "{a}", "{gcd}", "--alpha", "inf", "1", "-o", "{out}"], "finite", id="compose-alpha-inf"),
    C(["compose", "{a}", "{gcd}", "--alpha", "1", "-inf", "-o", "{out}"], "-inf", id="compose-alpha-negative-inf"),
    C(["compose", "{a}", "{gcd}", "--alpha", "1", "0", "--alpha-file", "{alpha_list}", "-o", "{out}"], "not both",
      id="compose-alpha-and-alpha-file"),
    C(["compose", "{a}", "{gcd}", "--alpha-file", "{alpha_scalar}", "-o", "{out}"], "list",
      id="compose-alpha-file-scalar-per-module"),
    C(["compose", "{a}", "{gcd}", "--alpha-file", "{new}.json", "-o", "{out}"], "not found",
      id="compose-alpha-file-missing"),
    C(["compose", "{a}", "{gcd}", "--alpha-file", "{dir}", "-o", "{out}"], "directory",
      id="compose-alpha-file-directory"),
    C(["compose", "{a}", "{gcd}", "--alpha-file", "{alpha_bad}", "-o", "{out}"], "JSON",
      id="compose-alpha-file-not-json"),
    C(["compose", "{a}", "{gcd}", "--alpha-file", "{alpha_string}", "-o", "{out}"], "list",
      id="compose-alpha-file-string"),
    C(["compose", "{a}", "{gcd}", "--alpha-file", "{alpha_unknown}", "-o", "{out}"], "modules",
      id="compose-alpha-file-unknown-module"),
    C(["compose", "{a}", "{gcd}", "--alpha-file", "{alpha_nan}", "-o", "{out}"], "finite",
      id="compose-alpha-file-nan"),
    C(["compose", "{a}", "{gcd}", "--alpha-file", "{alpha_count}", "-o", "{out}"], "2 experts",
      id="compose-alpha-file-count"),
    C(["compose", "{a}", "{gcd}", "--alpha-file", "{alpha_words}", "-o", "{out}"], "number",
      id="compose-alpha-file-words"),
    C(["compose", "{a}", "{gcd}", "--alpha-file", "{alpha_bool}", "-o", "{out}"], "number",
      id="compose-alpha-file-booleans"),
    C(["compose", "{a}", "{other_base}", "-o", "{out}"], "fingerprint", id="compose-mixed-bases"),
    C(["compose", "{a}", "{other_targets}", "-o", "{out}"], "targets", id="compose-mixed-targets"),
    C(["compose", "{a}", "{sigmoid}", "-o", "{out}"], "--as-z", id="compose-sigmoid-rescaled"),
    C(["compose", "{a}", "{new}", "-o", "{out}"], "not found", id="compose-missing-expert"),
    C(["compose", "{a}", "{empty}", "-o", "{out}"], "empty", id="compose-empty-file"),
    C(["compose", "{a}", "{text}", "-o", "{out}"], "safetensors", id="compose-text-file"),
    C(["compose", "{a}", "{bad_meta}", "-o", "{out}"], "metadata", id="compose-bad-metadata"),
    # adapt: strategy and classifier
    C(["adapt", "{a}", "{gcd}", "--strategy", "promt"], "strategy", id="adapt-strategy-typo"),
    C(["adapt", "{a}", "{gcd}"], "required", id="adapt-no-strategy"),
    C(["adapt", "{a}", "{gcd}", "--strategy", "classifier"], "--classifier", id="adapt-classifier-without-file"),
    C(["adapt", "{a}", "{gcd}", "--strategy", "oracle", "--classifier", "{cls}"], "--classifier",
      id="adapt-classifier-for-another-strategy"),
    C(["adapt", "{a}", "{gcd}", "--strategy", "classifier", "--classifier", "{cls_partial}"], "categories",
      id="adapt-classifier-labels"),
    C(["adapt", "{a}", "{gcd}", "--strategy", "classifier", "--classifier", "{no_task}"], "no training task",
      id="adapt-classifier-without-task"),
    C(["adapt", "{a}", "{gcd}", "--strategy", "classifier", "--classifier", "{a}"], "labels",
      id="adapt-classifier-not-a-classifier"),
    C(["adapt", "{a}", "{gcd}", "--strategy", "classifier", "--classifier", "{cls_other_base}"], "fingerprint",
      id="adapt-classifier-other-base"),
    C(["adapt", "{a}", "{gcd}", "--strategy", "classifier", "--classifier", "{new}"], "not found",
      id="adapt-classifier-missing"),
    C(["adapt", "{a}", "{gcd}", "--strategy", "classifier", "--classifier", "{cls}", "--split", "train"],
      "classifier's training problems", id="adapt-classifier-trained-on-the-split"),
    # adapt: numbers and splits
    C(["adapt", "{a}", "{gcd}", "--strategy", "oracle", "--size", "0"], "--size", id="adapt-size-0"),
    C(["adapt", "{a}", "{gcd}", "--strategy", "oracle", "--size", "-2"], "--size", id="adapt-size-negative"),
    C(["adapt", "{a}", "{gcd}", "--strategy", "few-shot", "--shots", "0"], "--shots", id="adapt-shots-0"),
    C(["adapt", "{a}", "{gcd}", "--strategy", "few-shot", "--population", "1"], "population",
      id="adapt-population-1"),
    C(["adapt", "{a}", "{gcd}", "--strategy", "few-shot", "--elite-fraction", "0"], "elite",
      id="adapt-elite-fraction-0"),
    C(["adapt", "{a}", "{gcd}", "--strategy", "few-shot", "--elite-fraction", "1.5"], "elite",
      id="adapt-elite-fraction-above-1"),
    C(["adapt", "{a}", "{gcd}", "--strategy", "few-shot", "--elite-fraction", "nan"], "elite",
      id="adapt-elite-fraction-nan"),
    C(["adapt", "{a}", "{gcd}", "--strategy", "few-shot", "--iterations", "0"], "iterations",
      id="adapt-iterations-0"),
    C(["adapt", "{a}", "{gcd}", "--strategy", "oracle", "--max-new-tokens", "0"], "--max-new-tokens",
      id="adapt-max-new-tokens-0"),
    C(["adapt", "{a}", "{gcd}", "--strategy", "oracle", "--split", "dev"], "split", id="adapt-unknown-split"),
    C(["adapt", "{a}", "{gcd}", "--strategy", "few-shot", "--shot-split", "dev"], "split",
      id="adapt-unknown-shot-split"),
    C(["adapt", "{a}", "{gcd}", "--strategy", "few-shot", "--shot-split", "test"], "another split",
      id="adapt-shots-from-the-evaluated-split"),
    # adapt: experts and names
    C(["adapt", "{a}", "{other_base}", "--strategy", "oracle"], "fingerprint", id="adapt-mixed-bases"),
    C(["adapt", "{a}", "{other_targets}", "--strategy", "oracle"], "targets", id="adapt-mixed-targets"),
    C(["adapt", "{a}", "{a}", "--strategy", "oracle"], "differ", id="adapt-duplicate-names"),
    C(["adapt", "base={a}", "{gcd}", "--strategy", "oracle"], "base", id="adapt-name-base"),
    C(["adapt", "other={a}", "{gcd}", "--strategy", "oracle"], "other", id="adapt-name-other"),
    C(["adapt", "oracle={a}", "{gcd}", "--strategy", "oracle"], "oracle", id="adapt-name-is-a-strategy"),
    C(["adapt", "={a}", "{gcd}", "--strategy", "oracle"], "name", id="adapt-empty-name"),
    C(["adapt", "x={new}", "{gcd}", "--strategy", "oracle"], "not found", id="adapt-named-expert-missing"),
    C(["adapt", "{no_task}", "{gcd}", "--strategy", "oracle"], "no training task", id="adapt-expert-without-task"),
    C(["adapt", "{a}", "{gcd}", "--strategy", "oracle", "--task", "x=arithmetic"], "'x', which is not an expert",
      id="adapt-task-for-an-unknown-expert"),
    C(["adapt", "{a}", "{gcd}", "--strategy", "oracle", "--task", "a=arithmetic", "a=gcd"], "twice",
      id="adapt-task-given-twice"),
    C(["adapt", "{a}", "{gcd}", "--strategy", "oracle", "--task", "a=no_such_task"], "no_such_task",
      id="adapt-task-unknown"),
    C(["adapt", "{a}", "{gcd}", "--strategy", "oracle", "--task-args", "a={"], "JSON", id="adapt-task-args-not-json"),
    C(["adapt", "{a}", "{gcd}", "--strategy", "oracle", "--task", "a"], "NAME=TASK", id="adapt-task-without-name"),
    C(["adapt", "{no_base}", "{gcd}", "--strategy", "oracle"], "records no base model",
      id="adapt-expert-without-base"),
    C(["adapt", "{bad_budget}", "{gcd}", "--strategy", "oracle"], "max_new_tokens", id="adapt-expert-bad-budget"),
    C(["adapt", "{a}", "{dir}", "--strategy", "oracle"], "directory", id="adapt-directory-as-expert"),
    C(["adapt", "{a}", "{gcd}", "--strategy", "prompt", "--describe", "sums"], "NAME=TEXT",
      id="adapt-describe-without-name"),
    C(["adapt", "{a}", "{gcd}", "--strategy", "prompt", "--describe", "zzz=sums"], "zzz",
      id="adapt-describe-unknown-expert"),
    C(["adapt", "{a}", "{gcd}", "--strategy", "oracle", "--describe", "a=sums"], "--describe",
      id="adapt-describe-for-another-strategy"),
    C(["adapt", "{a}", "{gcd}", "--strategy", "oracle", "--model", "{new}/model"], "not found",
      id="adapt-model-missing"),
    # adapt: output
    C(["adapt", "{a}", "{gcd}", "--strategy", "oracle", "--output", "{old_json}"], "--overwrite",
      id="adapt-output-exists"),
    C(["adapt", "{a}", "{gcd}", "--strategy", "oracle"], "--overwrite", id="adapt-default-output-exists",
      needs=("default_adapt",)),
    C(["adapt", "{a}", "{gcd}", "--strategy", "oracle", "--output", "{gcd}", "--overwrite"], "input",
      id="adapt-output-is-an-expert"),
    C(["adapt", "{a}", "{gcd}", "--strategy", "classifier", "--classifier", "{cls}", "--output", "{cls}",
       "--overwrite"], "input", id="adapt-output-is-the-classifier"),
    C(["adapt", "{a}", "{gcd}", "--strategy", "oracle", "--output", "{dir}"], "directory",
      id="adapt-output-is-a-directory"),
    # merge
    C(["merge", "{a}", "{text}"], "is a file", id="merge-onto-a-file"),
    C(["merge", "{a}", "{a}"], "input", id="merge-onto-its-expert"),
    C(["merge", "{a}", "{dir}"], "not empty", id="merge-onto-a-full-directory"),
    C(["merge", "{a}", "{afile}/merged"], "is a file", id="merge-under-a-file"),
    C(["merge", "{a}", ""], "empty", id="merge-empty-output-path"),
    C(["merge", "{no_base}", "{new}"], "records no base model", id="merge-expert-without-base"),
    C(["merge", "{a}", "{new}", "--model", "{new}/model"], "not found", id="merge-model-missing"),
    C(["merge", "{a}", "{new}", "--model", "{notmodel}"], "config.json", id="merge-model-not-a-model-directory"),
    C(["merge", "{new}.safetensors", "{out}"], "not found", id="merge-missing-expert"),
    C(["merge", "{dir}", "{out}"], "directory", id="merge-directory-as-expert"),
    C(["merge", "{empty}", "{out}"], "empty", id="merge-empty-expert"),
    C(["merge", "{text}", "{out}"], "safetensors", id="merge-text-as-expert"),
    C(["merge", "{nan_expert}", "{out}"], "non-finite", id="merge-nan-expert"),
    # export-lora
    C(["export-lora", "{a}", "{new}", "--rank", "0"], "--rank", id="export-lora-rank-zero"),
    C(["export-lora", "{a}", "{new}"], "required", id="export-lora-no-rank"),
    C(["export-lora", "{a}", "{new}", "--rank", "two"], "invalid int", id="export-lora-rank-text"),
    C(["export-lora", "{a}", "{dir}", "--rank", "4"], "not empty", id="export-lora-onto-a-full-directory"),
    C(["export-lora", "{a}", "{afile}", "--rank", "4"], "is a file", id="export-lora-onto-a-file"),
    C(["export-lora", "{no_base}", "{new}", "--rank", "4"], "records no base model", id="export-lora-no-base"),
    C(["export-lora", "{text}", "{new}", "--rank", "4"], "safetensors", id="export-lora-text-as-expert"),
    C(["export-lora", "{new}.safetensors", "{out}", "--rank", "4"], "not found", id="export-lora-missing-expert"),
    # import-sakana
    C(["import-sakana", "{sakana_text}", "--model", "{model}", "-o", "{out}"], "not a torch",
      id="sakana-text-file"),
    C(["import-sakana", "{sakana_harmful}", "--model", "{model}", "-o", "{out}"], "could run code",
      id="sakana-malicious-pickle"),
    C(["import-sakana", "{sakana_pickle}", "--model", "{model}", "-o", "{out}"], "could run code",
      id="sakana-plain-pickle"),
    C(["import-sakana", "{sakana_trunc}", "--model", "{model}", "-o", "{out}"], "not a torch",
      id="sakana-truncated"),
    C(["import-sakana", "{sakana_empty}", "--model", "{model}", "-o", "{out}"], "empty", id="sakana-empty-file"),
    C(["import-sakana", "{sakana_escape}", "--model", "{model}", "-o", "{out}"], "not a torch",
      id="sakana-escape-codes-in-name"),
    C(["import-sakana", "{sakana_nan}", "--model", "{model}", "-o", "{out}"], "non-finite", id="sakana-nan"),
    C(["import-sakana", "{sakana_inf}", "--model", "{model}", "-o", "{out}"], "non-finite", id="sakana-inf"),
    C(["import-sakana", "{sakana_2d}", "--model", "{model}", "-o", "{out}"], "1-D", id="sakana-matrix"),
    C(["import-sakana", "{sakana_int}", "--model", "{model}", "-o", "{out}"], "float", id="sakana-integers"),
    C(["import-sakana", "{sakana_zero}", "--model", "{model}", "-o", "{out}"], "no values", id="sakana-empty-vector"),
    C(["import-sakana", "{sakana_list}", "--model", "{model}", "-o", "{out}"], "state dict", id="sakana-list"),
    C(["import-sakana", "{sakana_dict0}", "--model", "{model}", "-o", "{out}"], "state dict", id="sakana-empty-dict"),
    C(["import-sakana", "{sakana_gap}", "--model", "{model}", "-o", "{out}"], "without gaps", id="sakana-gap"),
    C(["import-sakana", "{sakana_keys}", "--model", "{model}", "-o", "{out}"], "learnable_params",
      id="sakana-other-keys"),
    C(["import-sakana", "{new}.pt", "--model", "{model}", "-o", "{out}"], "not found", id="sakana-missing"),
    C(["import-sakana", "{dir}", "--model", "{model}", "-o", "{out}"], "directory", id="sakana-directory"),
    C(["import-sakana", "{sakana}", "--model", "{model}", "-o", "{old_st}"], "--overwrite",
      id="sakana-output-exists"),
    C(["import-sakana", "{sakana}", "--model", "{model}", "-o", "{sakana}", "--overwrite"], "input",
      id="sakana-output-is-the-input"),
    C(["import-sakana", "{sakana}", "--model", "{model}", "-o", "{dir}"], "directory",
      id="sakana-output-is-a-directory"),
    C(["import-sakana", "{sakana}", "--model", "{model}", "-o", "{fifo}", "--overwrite"], "not a regular file",
      id="sakana-output-is-a-pipe"),
    C(["import-sakana", "{sakana}", "--model", "{new}/model", "-o", "{out}"], "not found",
      id="sakana-model-missing"),
    C(["import-sakana", "{sakana}", "--model", "", "-o", "{out}"], "--model", id="sakana-model-empty"),
    C(["import-sakana", "{sakana}", "-o", "{out}"], "required", id="sakana-no-model"),
    C(["import-sakana", "{sakana}", "--model", "{llama}", "-o", "{out}"], "3 MLP matrices",
      id="sakana-count-from-the-models-config"),
    C(["import-sakana", "{sakana}", "--model", "{model}", "--task", "no_such_task", "-o", "{out}"], "no_such_task",
      id="sakana-unknown-task"),
    C(["import-sakana", "{sakana}", "--model", "{model}", "--task-args", "{}", "-o", "{out}"], "--task",
      id="sakana-task-args-without-task"),
    # export
    C(["export", "{run}", "{dir}"], "directory", id="export-onto-a-directory"),
    C(["export", "{run}", "{emptydir}", "--overwrite"], "directory", id="export-onto-a-directory-overwrite"),
    C(["export", "{run}", "{old_st}"], "--overwrite", id="export-output-exists"),
    C(["export", "{run}", "{tmp}/" + STATE, "--overwrite"], "input", id="export-onto-its-checkpoint"),
    C(["export", "{run}", "{tmp}/run/run.json", "--overwrite"], "input", id="export-onto-run-json"),
    C(["export", "{run}", "{afile}/e.safetensors"], "is a file", id="export-under-a-file"),
    C(["export", "{run_trunc}", "{out}"], "not a torch", id="export-truncated-checkpoint"),
    C(["export", "{run_harmful}", "{out}"], "could run code", id="export-malicious-checkpoint"),
    C(["export", "{run_text}", "{out}"], "not a torch", id="export-text-checkpoint"),
    C(["export", "{new}", "{out}"], "not found", id="export-missing-checkpoint"),
    C(["export", "{text}", "{out}"], "directory", id="export-file-as-checkpoint"),
    C(["export", "{run_empty}", "{out}"], "no checkpoints", id="export-run-without-checkpoints"),
    C(["export", "{run}/checkpoints", "{out}"], "no checkpoints", id="export-checkpoints-directory"),
    C(["export", "{run_nostate}", "{out}"], "run state", id="export-checkpoint-without-state"),
    C(["export", "{run_noinfo}", "{out}"], "run.json", id="export-without-run-json"),
    C(["export", "{run_badinfo}", "{out}"], "run.json", id="export-corrupt-run-json"),
    C(["export", "{run_listinfo}", "{out}"], "run.json", id="export-run-json-not-an-object"),
    C(["export", "{run_keys}", "{out}"], "base_fingerprint", id="export-run-json-missing-keys"),
    C(["export", "{run_noz}", "{out}"], "z", id="export-state-without-z"),
    C(["export", "{run_zlist}", "{out}"], "z", id="export-z-not-a-dict"),
    C(["export", "{run_nanz}", "{out}"], "non-finite", id="export-nan-z"),
    C(["export", "{run_badyaml}", "{out}"], "config.yaml", id="export-corrupt-config"),
    C(["export", "{run}"], "required", id="export-no-output"),
    # inspect
    C(["inspect", "{new}"], "not found", id="inspect-missing"),
    C(["inspect", "{dir}"], "directory", id="inspect-directory"),
    C(["inspect", "{trained}"], "did you mean", id="inspect-run-directory"),
    C(["inspect", "{empty}"], "empty", id="inspect-empty"),
    C(["inspect", "{text}"], "safetensors", id="inspect-text"),
    C(["inspect", "{plain}"], "not an svf-rl expert", id="inspect-foreign-safetensors"),
    C(["inspect", "{nan_expert}"], "non-finite", id="inspect-nan"),
    C(["inspect", "{bad_meta}"], "metadata", id="inspect-bad-metadata"),
    C(["inspect", "{sakana}"], "safetensors", id="inspect-sakana-file"),
    C(["inspect"], "required", id="inspect-nothing"),
]




def fill(argv: list[str], root, needs=()) -> list[str]:
    """Write the files the arguments name, and return the arguments with their paths filled in."""
    names = set(re.findall(r"\{(\w+)\}", " ".join(argv))) | set(needs)
    paths = {"tmp": root, "out": root / "out" / "result.safetensors", "new": root / "new"}
    for name in sorted(names - set(paths)):
        BUILD[name](root)
        paths[name] = root / FILES[name]
    return [re.sub(r"\{(\w+)\}", lambda m: str(paths[m.group(1)]), arg) for arg in argv]


def snapshot(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def assert_refused(argv: list[str], message: str, root, capsys) -> None:
    """Exit 2, one plain line naming the command and holding `message`, and nothing under `root` changed."""
    before = snapshot(root)
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert code == 2 and out == "", (code, out, err)
    assert len(lines) == 1 and lines[0].startswith(f"svf-rl {argv[0]}: error: "), err
    assert not CONTROL.search(err.rstrip("\n")) and "Traceback" not in err, repr(err)
    assert message in lines[0], lines[0]
    assert "weights_only" not in err, err  # never the advice to load a pickle unsafely
    assert snapshot(root) == before  # inputs byte-identical, no output, no temporary file left


@pytest.mark.parametrize("argv, message, needs", CASES)
def test_bad_input_is_one_line_before_the_model_loads_and_nothing_changes(argv, message, needs, tmp_path,
                                                                          monkeypatch, capsys):
    argv = fill(argv, tmp_path, needs)
    monkeypatch.chdir(tmp_path)  # where eval and adapt write their default output
    assert_refused(argv, message, tmp_path, capsys)


def test_the_vllm_engine_without_vllm_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    monkeypatch.chdir(tmp_path)
    for argv in (["eval", "{a}", "--engine", "vllm"], ["adapt", "{a}", "{gcd}", "--strategy", "oracle", "--engine",
                                                      "vllm"]):
        assert_refused(fill(argv, tmp_path), "needs vLLM", tmp_path, capsys)


@pytest.mark.parametrize("argv", [
    ["eval", "{a}", "--size", "2"],
    ["eval", "{a}", "{sigmoid}", "--alpha", "0.5", "0.5", "--samples", "2", "--output", "{old_json}", "--overwrite"],
    ["eval", "--task", "arithmetic", "--task-args", '{"digits": 1}', "--model", "{model}", "--split", "validation"],
    ["adapt", "{a}", "{gcd}", "--strategy", "oracle", "--size", "2"],
    ["adapt", "x={a}", "{gcd}", "--strategy", "x", "--size", "2", "--output", "{new}/adapt.json"],
    ["adapt", "{a}", "{gcd}", "--strategy", "prompt", "--describe", "a=sums", "--size", "2"],
    ["adapt", "{a}", "{gcd}", "--strategy", "classifier", "--classifier", "{cls}", "--size", "2"],
    ["adapt", "{a}", "{gcd}", "--strategy", "few-shot", "--shots", "2", "--size", "2", "--mixture-shots"],
    ["merge", "{a}", "{new}"],
    ["merge", "{a}", "{emptydir}", "--model", "{model}"],
    ["import-sakana", "{sakana}", "--model", "{model}", "-o", "{old_st}", "--overwrite"],
    ["import-sakana", "{sakana}", "--model", "{model}", "--task", "arithmetic", "-o", "{new}.safetensors"],
    ["export-lora", "{a}", "{new}", "--rank", "2"],
    ["adapt", "{no_task}", "{gcd}", "--strategy", "oracle", "--task", "notask=arithmetic", "--size", "2"],
], ids=lambda argv: "-".join(a for a in argv if not a.startswith(("{", "-"))))
def test_good_input_passes_the_checks_and_reaches_the_model(argv, tmp_path, monkeypatch):
    argv = fill(argv, tmp_path)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(ModelOpened):
        main(argv)
    assert snapshot(tmp_path) == before  # nothing is written before the model has run


def test_compose_replaces_an_existing_output_only_when_asked(tmp_path, capsys):
    a, gcd, old, alpha = fill(["{a}", "{gcd}", "{old_st}", "{alpha_list}"], tmp_path)
    before = Path(old).read_bytes()
    assert main(["compose", a, gcd, "-o", old]) == 2 and Path(old).read_bytes() == before
    assert main(["compose", a, gcd, "--alpha", "0.25", "0.75", "-o", old, "--overwrite"]) == 0
    assert load_expert(old).config["composition"]["alpha"] == [0.25, 0.75]
    nested = tmp_path / "new" / "deeper" / "mix.safetensors"  # a missing parent directory is created
    assert main(["compose", a, gcd, "--alpha-file", alpha, "-o", str(nested)]) == 0
    assert load_expert(nested).config["composition"]["alpha"] == [0.5, 0.5]
    assert not list(tmp_path.rglob(".*"))  # no temporary file left


def test_export_and_inspect_accept_good_input(tmp_path, capsys):
    run, old = fill(["{run}", "{old_st}"], tmp_path)
    out = tmp_path / "new" / "e.safetensors"
    assert main(["export", run, str(out)]) == 0 and load_expert(out).scores == {"step": 2}
    assert main(["export", run, old]) == 2
    assert main(["export", f"{run}/checkpoints/step_000002", old, "--overwrite"]) == 0
    assert load_expert(old).base_fingerprint == FINGERPRINT
    assert main(["inspect", old]) == 0 and "step: 2" in capsys.readouterr().out


def test_messages_are_made_one_plain_line():
    text = "a\x1b[31mred\x1b[0m\nnext\x9b2J \x1b]8;;http://x\x07link\x1b]8;;\x07\ttab\x07"
    assert one_line(text) == "ared next 2J link tab"

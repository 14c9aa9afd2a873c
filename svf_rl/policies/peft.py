"""The LoRA family through PEFT: lora (and PiSSA's start), dora, loraplus, lorafa, vera, adalora, tinylora, ia3.

PEFT adapts the model in place; the HF module names stay as they were, so an adapted layer is named as the
matrix it adapts. π_ref is the adapter switched off. A run saves a PEFT adapter directory (`save_pretrained`),
which `PeftModel.from_pretrained` loads without svf-rl.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from svf_rl.policies.base import PolicyError, check_args, linear_map
from svf_rl.targets import find_targets

RECORD = "svf_rl.json"  # beside the adapter: base fingerprint, targets, task, training config, scores
TRAINER_STATE = "trainer_state.safetensors"  # the run's own state: AdaLoRA's unpruned ranks, PiSSA's own B and A


@dataclass
class LoraArgs:
    rank: int = 16
    alpha: float = 32.0  # the update is scaled by alpha / rank (alpha / √rank with rslora)
    rslora: bool = False

    def check(self):
        if self.rank < 1 or self.alpha <= 0:
            return f"rank must be at least 1 and alpha > 0, got rank={self.rank}, alpha={self.alpha}"


@dataclass
class PlainLoraArgs(LoraArgs):
    init: str = "default"  # default (B = 0, A Kaiming-uniform) | gaussian | pissa (the principal components)

    def check(self):
        if self.init not in ("default", "gaussian", "pissa"):
            return f"init must be default, gaussian or pissa, got {self.init!r}"
        return super().check()


@dataclass
class LoraPlusArgs(LoraArgs):
    ratio: float = 16.0  # B's learning rate over A's (LoRA+, Hayou et al. 2024: 2⁴)

    def check(self):
        return super().check() or (f"ratio must be > 0, got {self.ratio}" if self.ratio <= 0 else None)


@dataclass
class VeraArgs:
    rank: int = 256  # of the shared random matrices (VeRA's own default)
    d_initial: float = 0.1  # initial value of the scale on the rank dimension

    def check(self):
        if self.rank < 1:
            return f"rank must be at least 1, got {self.rank}"


@dataclass
class AdaLoraArgs:
    init_rank: int = 12  # every layer's rank at the start
    target_rank: int = 8  # the average rank the allocator prunes to
    tinit: int = 0  # steps before pruning starts
    tfinal: int = 0  # steps at the end with the final ranks
    delta_t: int = 1  # steps between re-allocations
    alpha: float = 32.0
    orth_reg_weight: float = 0.5  # keeps P and Q orthogonal, as the SVD form assumes (PEFT's default)

    def check(self):
        if not 1 <= self.target_rank <= self.init_rank:
            return f"need 1 <= target_rank <= init_rank, got {self.target_rank} and {self.init_rank}"
        if min(self.tinit, self.tfinal) < 0 or self.delta_t < 1:
            return "tinit and tfinal must be >= 0 and delta_t >= 1"


@dataclass
class TinyLoraArgs:
    rank: int = 2  # frozen top singular directions per matrix (the paper's r = 2)
    u: int = 64  # trained numbers per group of matrices
    weight_tying: float = 0.0  # share of matrices that share their vector (1.0: one vector for the whole model)

    def check(self):
        if self.rank < 1 or self.u < 1 or not 0 <= self.weight_tying <= 1:
            return "rank and u must be at least 1 and weight_tying in [0, 1]"


@dataclass
class IA3Args:
    input_scaled: str = r"(down_proj|fc2|w2|dense_4h_to_h)$"  # feed-forward outputs: IA3 scales their input

    def check(self):
        import re

        try:
            re.compile(self.input_scaled)
        except re.error as err:
            return f"input_scaled is not a valid regex: {err}"


SCHEMAS = {"lora": PlainLoraArgs, "dora": LoraArgs, "loraplus": LoraPlusArgs, "lorafa": LoraArgs,
           "vera": VeraArgs, "adalora": AdaLoraArgs, "tinylora": TinyLoraArgs, "ia3": IA3Args}

# Adam learning rates that learn on the embedded default (30 steps; benchmarks/RESULTS.md). LoRA in RL wants about
# 10× full fine-tuning's rate ("LoRA Without Regret", 2025); vectors that scale (IA3, VeRA's, TinyLoRA's) more.
# AdaLoRA's E starts at 0 and multiplies B and A (both about 0.02): at 5e-4 its default run never moved.
# Table 1's sweeps (RESULTS §13) chose lora's and dora's 5e-4, vera's 3e-2 and tinylora's 1e-4 on validation.
DEFAULT_LR = {"lora": 5e-4, "dora": 5e-4, "loraplus": 2e-4, "lorafa": 5e-4, "adalora": 1e-2, "vera": 3e-2,
              "tinylora": 1e-4, "ia3": 5e-3}


class PeftPolicy:
    DEFAULT_LR = DEFAULT_LR
    artefact = "adapter"
    starts_at_base = True  # B = 0 (PiSSA: W − B₀A₀ + B₀A₀)
    checkpoint_key = "adapter"

    def __init__(self, config, kind: str | None = None, name: str | None = None):
        """`kind`: the PEFT method (a policy of svf-rl's own builds on one); `name`: the policy's."""
        self.kind, self.name = kind or config.policy, name or config.policy
        self.args = check_args(self.name, SCHEMAS[self.kind], config.policy_args)
        self.targets, self.steps = config.targets, config.steps
        if getattr(self.args, "init", "") == "pissa" and config.kl_coef > 0:
            raise PolicyError("init=pissa moves the principal components out of the base weights, so the adapter "
                              "switched off is not the base model; use kl_coef=0 or init=default")
        if self.kind == "lorafa" and config.optimizer != "adamw":
            raise PolicyError("lorafa is its own AdamW (PEFT's LoRA-FA optimiser); leave optimizer=adamw")
        if self.kind == "adalora" and self.args.tinit + self.args.tfinal >= config.steps:
            raise PolicyError(f"adalora needs tinit + tfinal < steps={config.steps}, got "
                              f"{self.args.tinit} + {self.args.tfinal}")
        self.pissa = getattr(self.args, "init", "") == "pissa"
        if self.kind == "adalora" and config.engine == "vllm_server":
            raise PolicyError("adalora prunes its ranks as it trains, which a vLLM server's copy does not follow yet; "
                              "use engine=vllm or hf")
        if self.pissa and config.engine == "vllm_server":
            raise PolicyError("init=pissa moves the principal components out of the base weights, which vLLM "
                              "servers hold as stored; use engine=vllm or hf with it")
        self.whole_gradients = self.kind in ("adalora", "lorafa")  # read after the step; ZeRO partitions them
        self.model = self.peft = None
        self.layers: dict = {}
        self.sharded = False

    # Attaching ------------------------------------------------------------------------------------------------

    def peft_config(self, names: list[str]):
        import peft

        a, common = self.args, {"target_modules": names, "task_type": "CAUSAL_LM"}
        if self.kind in ("lora", "dora", "loraplus", "lorafa"):
            init = {"default": True, "gaussian": "gaussian", "pissa": "pissa"}[getattr(a, "init", "default")]
            return peft.LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=0.0, use_rslora=a.rslora,
                                   use_dora=self.kind == "dora", init_lora_weights=init, **common)
        if self.kind == "vera":
            return peft.VeraConfig(r=a.rank, d_initial=a.d_initial, vera_dropout=0.0, **common)
        if self.kind == "adalora":
            return peft.AdaLoraConfig(init_r=a.init_rank, target_r=a.target_rank, tinit=a.tinit, tfinal=a.tfinal,
                                      deltaT=a.delta_t, lora_alpha=a.alpha, lora_dropout=0.0,
                                      total_step=self.steps, **common)
        if self.kind == "tinylora":
            return peft.TinyLoraConfig(r=a.rank, u=a.u, weight_tying=a.weight_tying, **common)
        import re

        return peft.IA3Config(feedforward_modules=[n for n in names if re.search(a.input_scaled, n)], **common)

    def attach(self, model, prompts=(), progress: bool = False) -> None:
        self.attach_to(model, find_targets(model, self.targets))

    def attach_to(self, model, names: list[str]) -> None:
        import warnings

        import peft
        from peft.tuners.tuners_utils import BaseTunerLayer

        with warnings.catch_warnings():  # PEFT warns of what does not apply here (e.g. AdaLoRA without labels)
            warnings.simplefilter("ignore")
            self.peft = peft.get_peft_model(model, self.peft_config(names))
        self.model = model  # adapted in place: forwards, generate and DeepSpeed use the HF model itself
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
        self.initial = {id(p): p.detach().clone() for p in self.parameters()}  # for the logged shift
        if self.pissa:  # PEFT converts a saved PiSSA adapter against its start, to load onto the base weights
            import atexit
            import shutil
            import tempfile

            self.pissa_start = tempfile.mkdtemp(prefix="pissa_start_")
            atexit.register(shutil.rmtree, self.pissa_start, True)
            config = self.peft.peft_config["default"]
            config.init_lora_weights = True
            self.peft.save_pretrained(self.pissa_start)
            config.init_lora_weights = "pissa"

    # Training -------------------------------------------------------------------------------------------------

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """Weight decay pulls towards the base model: LoRA's A and B towards 0, IA3's scales towards 1; DoRA's
        magnitudes (the base weight's row norms) are left out of it."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        centre = 1.0 if self.kind == "ia3" else 0.0
        groups = [{"params": [p for n, p in named if "magnitude" not in n], "lr": lr, "weight_decay": weight_decay,
                   "centre": centre}]
        magnitudes = [p for n, p in named if "magnitude" in n]
        if magnitudes:
            groups.append({"params": magnitudes, "lr": lr, "weight_decay": 0.0})
        return groups

    def optimizer(self, optimizer_class, lr: float, weight_decay: float, **kwargs):
        if self.kind == "loraplus":
            from peft.optimizers import create_loraplus_optimizer

            return create_loraplus_optimizer(self.peft, optimizer_class, lr=lr, loraplus_lr_ratio=self.args.ratio,
                                             weight_decay=weight_decay, **kwargs)
        if self.kind == "lorafa":
            from peft.optimizers import create_lorafa_optimizer

            return create_lorafa_optimizer(self.peft, self.args.rank, self.args.alpha, lr, weight_decay)
        return optimizer_class(self.param_groups(lr, weight_decay), **kwargs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        if self.kind == "adalora":  # PEFT's own state prunes the ranks, which this model keeps: the tensors as held
            state = {k: v.detach().clone() for k, v in self.model.state_dict().items()
                     if any(part in k for part in (".lora_A.", ".lora_B.", ".lora_E.", ".ranknum."))}
        else:
            state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.peft).items()}
        allocator = getattr(self.peft.base_model, "rankallocator", None)
        if allocator is not None:  # AdaLoRA's importance averages: a resumed run allocates as an unbroken one
            for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
                state.update({f"rankallocator.{kind}.{n}": t.clone() for n, t in getattr(allocator, kind).items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        allocator = getattr(self.peft.base_model, "rankallocator", None)
        adapter = {k: v for k, v in state.items() if not k.startswith("rankallocator.")}
        for key, value in state.items():
            if key.startswith("rankallocator.") and allocator is not None:
                _, kind, name = key.split(".", 2)
                getattr(allocator, kind)[name] = value.to(self.parameters()[0].device)
        if self.kind == "adalora":
            result = self.model.load_state_dict(adapter, strict=False)
        else:
            result = set_peft_model_state_dict(self.peft, adapter)
        if getattr(result, "unexpected_keys", None):
            raise PolicyError(f"adapter state has keys this {self.name} adapter lacks, e.g. "
                              f"{result.unexpected_keys[0]}")

    def reference(self):
        return self.peft.disable_adapter()

    def step(self, tokens: int, gather_per_step: bool, loss_scale: float = 1.0, sequences: int = 0,
             unpadded: int = 0):
        return contextlib.nullcontext()

    def sequences(self, completions: list):
        return contextlib.nullcontext()  # nothing kept per sequence

    def regulariser(self) -> torch.Tensor | None:
        """AdaLoRA's orthogonality penalty, w·mean over its P and Q of ‖PPᵀ − I‖_F (‖QᵀQ − I‖_F); added to each
        step's loss once. None for the others."""
        if self.kind != "adalora" or self.args.orth_reg_weight == 0:
            return None
        terms = []
        for name, p in self.model.named_parameters():
            if p.requires_grad and ("lora_A" in name or "lora_B" in name) and p.numel():
                gram = p @ p.T if "lora_A" in name else p.T @ p
                terms.append(torch.linalg.matrix_norm(gram - torch.eye(len(gram), device=p.device, dtype=p.dtype)))
        return self.args.orth_reg_weight * torch.stack(terms).mean()

    def after_step(self, step: int) -> None:
        if self.kind == "adalora":  # prunes ranks from |θ·∂L/∂θ|: every rank has the same, reduced gradient
            self.peft.base_model.update_and_allocate(step)

    # Engines ---------------------------------------------------------------------------------------------------

    def engine_weights(self):
        for name, layer in self.layers.items():
            yield f"{name}.weight", linear_map(layer)

    def inference_config(self):
        """The adapter's configuration as inference must apply it (Delta-LoRA scales it)."""
        return self.peft.peft_config["default"]

    @contextlib.contextmanager
    def saved_config(self, base_model: str):
        """The configuration as `save_pretrained` writes it: the base model named, inference's scale."""
        config = self.inference_config()
        saved = config.base_model_name_or_path
        config.base_model_name_or_path = base_model
        try:
            yield config
        finally:
            config.base_model_name_or_path = saved

    def server_setup(self) -> dict:
        """The configuration, and the whole adapter state once (VeRA's and TinyLoRA's frozen tensors too)."""
        with self.saved_config("") as saved:
            config = saved.to_dict()
        self.served = self.adapter_state()
        return {"policy": "peft", "names": list(self.layers), "state": self.served,
                "config": json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))}

    def server_update(self) -> dict[str, torch.Tensor]:
        """The adapter tensors that changed since the servers last had them: the trained ones."""
        state = self.adapter_state()
        changed = {k: v for k, v in state.items() if k not in self.served or not torch.equal(v, self.served[k])}
        self.served = state
        return changed

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors as PEFT names them, which the servers' PEFT loads."""
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.peft).items()}

    def metrics(self) -> dict[str, float]:
        shift = torch.cat([(p.detach() - self.initial[id(p)]).flatten().float() for p in self.parameters()])
        return {"param_shift": shift.norm().item(), "param_shift_max": shift.abs().max().item()}

    def progress(self, metrics: dict) -> str:
        return f"|Δθ| {metrics['param_shift']:.1e}"

    # Artefacts -------------------------------------------------------------------------------------------------

    def save(self, path: Path, record: dict, scores: dict) -> Path:
        """A PEFT adapter directory, written whole or not at all, with svf-rl's record beside it."""
        from svf_rl.run_files import atomic_directory

        path = Path(path)
        if path.exists():
            import shutil

            shutil.rmtree(path)  # the previous best of this run
        with self.saved_config(record["model"]), atomic_directory(path) as staging:
            # PiSSA: a LoRA of rank 2r against the base weights as stored; AdaLoRA: its ranks pruned to their
            # allocation. The run reloads its own state, kept beside them.
            self.peft.save_pretrained(staging, save_embedding_layers=False,
                                      path_initial_model_for_weight_conversion=self.pissa_start if self.pissa else None)
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, staging / TRAINER_STATE)
            info = {"policy": self.name, "base_model": record["model"], "base_fingerprint": record["fingerprint"],
                    "targets": self.targets, "task": record["task"], "config": record["config"], "scores": scores}
            (staging / RECORD).write_text(json.dumps(info, indent=2, default=str))
        return path

    def load(self, path: Path, fingerprint: str) -> None:
        from safetensors.torch import load_file

        info = read_record(path)
        if info.get("base_fingerprint") != fingerprint:
            raise PolicyError(f"{path} was trained on other base weights (fingerprint {info.get('base_fingerprint')}"
                              f", this model's is {fingerprint})")
        self.load_state_dict(load_file(Path(path) / TRAINER_STATE))

    def shard(self) -> None:
        self.sharded = True

    def memory(self, targets: list[tuple[str, int, int]], b: int) -> dict:
        """For the memory model, from shapes alone: trainable parameters, frozen adapter bytes, and the rank of
        the activation autograd keeps per target (None: nothing beyond LoRA's input)."""
        a, kind = self.args, self.kind
        ins, outs = sum(i for _, _, i in targets), sum(o for _, o, _ in targets)
        if kind in ("lora", "dora", "loraplus", "lorafa"):
            trainable = a.rank * (ins + outs) + (outs if kind == "dora" else 0)
            frozen = a.rank * ins * 4 if kind == "lorafa" else 0
            if kind == "lorafa":
                trainable -= a.rank * ins
            return {"trainable": trainable, "frozen_bytes": frozen, "rank": a.rank}
        if kind == "adalora":
            return {"trainable": a.init_rank * (ins + outs + len(targets)), "frozen_bytes": 0, "rank": a.init_rank}
        if kind == "vera":
            widest_in, widest_out = max(i for _, _, i in targets), max(o for _, o, _ in targets)
            return {"trainable": outs + a.rank * len(targets), "frozen_bytes": a.rank * (widest_in + widest_out) * 4,
                    "rank": a.rank}
        if kind == "tinylora":
            return {"trainable": a.u * len(targets),
                    "frozen_bytes": len(targets) * (a.u * a.rank * a.rank * 4) + a.rank * (ins + outs) * b,
                    "rank": a.rank}
        return {"trainable": outs, "frozen_bytes": 0, "rank": 0}  # ia3


def is_adapter_dir(path) -> bool:
    return Path(path).is_dir() and (Path(path) / "adapter_config.json").is_file()


def read_record(path) -> dict:
    try:
        return json.loads((Path(path) / RECORD).read_text())
    except (OSError, ValueError):
        return {}

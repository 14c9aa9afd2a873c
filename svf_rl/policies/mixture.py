"""A mixture of SVF experts: each token's z is 1 + Σₖ gₖ(x)(zₖ − 1), on the base model's own U, s, Vᵀ.

The experts are expert files trained on this base model (frozen unless `train_experts`); the options are the
base model (g₀, which adds nothing) and the K experts. `routing=token`: a router per adapted layer gives each
token its gates from the layer's input (MoV's per-token soft routing, here over singular-value scales).
`routing=sequence`: one router gives each completion its gates from its prompt alone, once (a learned
Transformer² first pass): the base model reads the prompt, the router maps the mean of its final hidden states
(less their mean over the training prompts, at unit length: PromptRouter) to gates, and every layer runs the
whole sequence at that z. The layer runs factored, U((s ⊙ z) ⊙ Vᵀx), which costs (in + out)·r per token. π_ref
is the base model (z = 1).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from svf_rl.policies.base import PolicyError, check_args
from svf_rl.policies.routing import RoutedPolicy, Router, keep_fp32, keep_routes, watch_positions
from svf_rl.policies.svf_layer import SVFLinear, apply_svf, reference_mode, svf_layers


@dataclass
class MixtureArgs:
    experts: list = field(default_factory=list)  # expert files of this base model and targets
    routing: str = "token"
    top_k: int = 0  # 0: every option; k: the k largest gates of base + experts (the rest: the base)
    balance: float = 0.0  # coefficient of the load-balancing term (routing.py)
    train_experts: bool = False  # the experts' z train too (MoV trains all), from their trained values

    def check(self):
        if not self.experts or not all(isinstance(e, str) and e for e in self.experts):
            return "experts must list at least one expert file, e.g. policy_args.experts=[runs/a/expert.safetensors]"
        if self.routing not in ("token", "sequence"):
            return (f"routing must be token (each token's gates from its layer input) or sequence (each "
                    f"completion's from its prompt), got {self.routing!r}")
        if not 0 <= self.top_k <= len(self.experts) + 1:
            return f"top_k must be 0 (all) or at most {len(self.experts) + 1} (the base and each expert)"
        if not 0 <= self.balance < float("inf"):
            return f"balance must be >= 0 and finite, got {self.balance}"


class MixtureLinear(SVFLinear):
    """An SVF layer whose z is mixed per token from frozen (or trained) expert vectors."""

    def __init__(self, layer: SVFLinear, experts: torch.Tensor, router: Router | None, train_experts: bool):
        super().__init__(layer.U.data, layer.s.data, layer.Vh.data, layer.bias, "factored")
        self.z.requires_grad_(False)  # stays 1
        self.cache_policy = self.cache_reference = False  # π_ref's forwards run factored: no W'(1) kept
        self.experts = nn.Parameter(experts.float().to(layer.s.device), requires_grad=train_experts)  # [K, r]
        self.router = None if router is None else router.to(layer.s.device)  # None: routed by sequence
        self.row_gates: torch.Tensor | None = None  # [rows, 1 + K]: each sequence's gates (routing=sequence)

    def _apply(self, fn, recurse=True):
        """model.to(dtype) casts the factors, never the experts or the router: their updates would round away."""
        super()._apply(fn, recurse)
        keep_fp32([self.experts, *(self.router.parameters() if self.router is not None else ())])
        return self

    def mixed_z(self, gates: torch.Tensor) -> torch.Tensor:
        """z = 1 + Σₖ gₖ(zₖ − 1) for gates [..., 1 + K] (the base's first, which adds nothing)."""
        return 1 + gates[..., 1:] @ (self.experts - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_reference:
            return super().forward(x)
        if self.router is not None:
            gates = self.router(x)  # [..., 1 + K]: the base, then each expert
        elif self.row_gates is None:
            raise RuntimeError("a sequence-routed mixture ran without its prompts' first pass (policy.rows)")
        else:
            gates = rows_of(self.row_gates, x.shape[0])
            gates = gates.view(x.shape[0], *[1] * (x.dim() - 2), gates.shape[-1])
        z = self.mixed_z(gates)
        scaled = (F.linear(x, self.Vh).float() * (self.s.float() * z)).to(x.dtype)
        return F.linear(scaled, self.U, self.bias)


class MixturePolicy(RoutedPolicy):
    name = "mixture"
    starts_at_base = False  # it starts at the experts' uniform mixture
    DEFAULT_LR = {"mixture": 1e-2}  # chosen on validation over 1e-3 (benchmarks/RESULTS.md §12, one seed)

    def __init__(self, config):
        super().__init__(config)
        self.args = check_args("mixture", MixtureArgs, config.policy_args)
        if (self.args.routing == "sequence" and config.engine == "vllm_server"
                and int(os.environ.get("WORLD_SIZE", "1")) > 1):  # set by accelerate launch and torchrun
            raise PolicyError("routing=sequence through a vLLM server pushes each prompt's weights in turn, which "
                              "one training process can do, not several; launch one, or use engine=vllm (an "
                              "engine per process)")
        if self.args.routing == "sequence" and getattr(config, "gradient_checkpointing", False):
            raise PolicyError("routing=sequence with gradient_checkpointing: a recomputed layer would run without "
                              "its sequences' gates; use routing=token or gradient_checkpointing=false")
        self.router: PromptRouter | None = None  # routing=sequence: the one router, on the prompt's hidden states
        self.calibration: list[list[int]] = []  # routing=sequence: the prompts its centre is the mean of
        self.engine_gates: torch.Tensor | None = None  # the gates engine_weights composes at (at_gates)
        self.rollout_top1: dict[tuple, int] = {}  # prompt → its top-1 option when sampled (route_agreement)
        self.agreement = [0, 0]  # update sequences whose top-1 is their rollout's, of those compared
        self.experts = read_experts(self.args.experts, config.targets)
        self.labels = ["base"] + expert_labels(self.args.experts, self.experts)
        # What the file records is what was read: the expert files may move or change during the run.
        self.expert_files = [{"path": str(Path(p).resolve()), "task": e.task, "label": label,
                              "sha256": hashlib.sha256(Path(p).read_bytes()).hexdigest()}
                             for p, e, label in zip(self.args.experts, self.experts, self.labels[1:], strict=True)]

    @classmethod
    def from_file(cls, config, tensors: dict, info: dict):
        """The mixture as saved: its experts' vectors are read from the file, not from their paths."""
        from svf_rl.inference.expert import Expert

        policy = cls.__new__(cls)
        RoutedPolicy.__init__(policy, config)
        policy.args = check_args("mixture", MixtureArgs, config.policy_args)
        policy.router, policy.calibration, policy.engine_gates = None, [], None
        policy.rollout_top1, policy.agreement = {}, [0, 0]
        names = [k.removesuffix(".experts") for k in tensors if k.endswith(".experts")]
        policy.experts = [Expert({n: tensors[f"{n}.experts"][k] for n in names}, info["base_model"],
                                 info["base_fingerprint"], info["targets"], label)
                          for k, label in enumerate(info["labels"][1:])]
        policy.labels = list(info["labels"])
        policy.expert_files = info["policy_args"].get("expert_files", [])
        return policy

    def attach(self, model, prompts=(), progress: bool = False) -> None:
        from svf_rl.base_model import cache_root
        from svf_rl.inference.expert import ExpertError, as_scale_expert
        from svf_rl.svd import model_fingerprint

        fingerprint = model_fingerprint(model)
        apply_svf(model, self.targets, "factored", cache_root() / "svd", progress=progress)
        layers = svf_layers(model)
        shapes = {name: layer.z.numel() for name, layer in layers.items()}
        vectors = []
        for path, expert in zip(self.args.experts, self.experts, strict=True):
            try:
                expert.check_compatible(shapes, fingerprint, self.targets)
            except ExpertError as err:
                raise PolicyError(f"policy_args.experts: {path}: {err}") from None
            vectors.append(as_scale_expert(expert, lambda module: layers[module].s).vectors)
        options, per_token = len(vectors) + 1, self.args.routing == "token"
        for name, layer in layers.items():
            router = Router(layer.in_features, options, self.args.top_k, self.args.balance) if per_token else None
            mixed = MixtureLinear(layer, torch.stack([v[name] for v in vectors]), router, self.args.train_experts)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, mixed)
        if not per_token:  # a module of the model, so that DDP and DeepSpeed see its parameters
            self.router = PromptRouter(model.config.hidden_size, options, self.args.top_k, self.args.balance)
            self.calibration = list(prompts)  # the router's centre is their mean pooled state (first use)
            self.router.centred = False
            model.add_module(SEQUENCE_ROUTER, self.router.to(next(iter(layers.values())).s.device))
            model.route_rows = self.rows  # the engines' and the update's first pass (logprobs.prompt_rows)
        else:  # the HF engine keeps each sampled token's routes (engines.hf.kept_routes)
            model.keep_routes = functools.partial(keep_routes, model)
        self.model, self.layers = model, svf_layers(model)
        watch_positions(model)

    def routes(self, config) -> str:
        if config.policy_args.get("routing") == "sequence":
            return "routes each sequence by a first pass over its prompt"
        return super().routes(config)

    @classmethod
    def runs_on_vllm(cls, config) -> bool:
        return config.policy_args.get("routing") == "sequence"  # a prompt's weights are an SVF expert's

    @property
    def per_prompt(self) -> bool:
        """Whether its weights follow the prompt: a vLLM engine then generates each prompt at its own (engines/
        per_prompt.py)."""
        return self.router is not None

    @torch.no_grad()
    def prompt_gates(self, prompts: list[list[int]], repeats: int = 1) -> torch.Tensor | None:
        """[prompts, 1 + K]: each prompt's gates, from rows()' first pass (the rollout statistics count `repeats`
        sequences per prompt, as rows() does); None in π_ref's scope, which routes nothing."""
        from svf_rl.engines.hf import left_pad

        if any(layer.use_reference for layer in self.layers.values()):
            return None
        self.ensure_centre()
        device, out = self.router.centre.device, []
        for start in range(0, len(prompts), 16):  # the first pass keeps every layer's states: 16 prompts at a time
            ids, mask = left_pad(prompts[start:start + 16], 0)  # the mask hides the padding from the first pass
            features = prompt_features(self.model, ids.to(device), mask.to(device))
            out.append(self.router(features.repeat_interleave(repeats, 0))[::repeats])
            self.note_top1(ids, mask, out[-1])
        return torch.cat(out)

    def note_top1(self, ids: torch.Tensor, mask: torch.Tensor, gates: torch.Tensor) -> None:
        """Each prompt's top-1 option: kept when it is sampled (no gradient), compared when the update routes it."""
        keys = [tuple(row[m.bool()].tolist()) for row, m in zip(ids.cpu(), mask.cpu(), strict=True)]
        top1 = gates.detach().argmax(-1).tolist()
        if not torch.is_grad_enabled():
            self.rollout_top1.update(zip(keys, top1, strict=True))
            return
        for key, option in zip(keys, top1, strict=True):
            if key in self.rollout_top1:
                self.agreement[0] += self.rollout_top1[key] == option
                self.agreement[1] += 1

    def metrics(self) -> dict[str, float]:
        """The routing statistics, and for a sequence router `route_agreement`: the share of the step's update
        sequences whose top-1 option is the one their prompt had when sampled (1 unless routing moved in between)."""
        out = super().metrics()
        if self.agreement[1]:
            out["route_agreement"] = self.agreement[0] / self.agreement[1]
        self.rollout_top1, self.agreement = {}, [0, 0]
        return out

    @contextlib.contextmanager
    def at_gates(self, gates: torch.Tensor | None):
        """Within: engine_weights and server_update are one prompt's weights, every layer at z = 1 + Σₖ gₖ(zₖ − 1)
        (as its forward computes it, factored), an SVF expert's; gates None: the base model's."""
        self.engine_gates = gates
        try:
            yield
        finally:
            self.engine_gates = None

    def engine_z(self) -> dict[str, torch.Tensor]:
        gates = self.engine_gates
        if gates is None:
            return {name: torch.ones_like(layer.z.detach()) for name, layer in self.layers.items()}
        with torch.no_grad():
            return {name: layer.mixed_z(gates.to(layer.experts.device).float()) for name, layer in self.layers.items()}

    def engine_weights(self):
        for name, z in self.engine_z().items():
            yield f"{name}.weight", self.layers[name].compose_for_inference(z)

    def server_setup(self) -> dict:
        return {"policy": "svf", "names": list(self.layers)}  # the server composes W' from each prompt's z

    def server_update(self) -> dict[str, torch.Tensor]:
        return {name: z.float().cpu() for name, z in self.engine_z().items()}

    def named_parameters(self) -> dict[str, nn.Parameter]:
        return {**super().named_parameters(), **self.sequence_router()}

    def sequence_router(self) -> dict[str, nn.Parameter]:
        """routing=sequence: the router's trained tensors by name (none for token routing)."""
        return {} if self.router is None else {f"{SEQUENCE_ROUTER}.{n}": p for n, p in self.router.named_parameters()}

    def sequence_router_state(self) -> dict[str, torch.Tensor]:
        """What a file and a checkpoint keep of the sequence router: its parameters and its centre."""
        if self.router is None:
            return {}
        return {**self.sequence_router(), CENTRE: self.router.centre}

    def ensure_centre(self) -> None:
        if not self.router.centred:
            self.set_centre(mean_prompt_feature(self.model, self.calibration) if self.calibration else None)

    @torch.no_grad()
    def set_centre(self, centre: torch.Tensor | None) -> None:
        """None: a file or checkpoint from before routers were centred, read as it was trained (no centre)."""
        self.router.centre.copy_(torch.zeros_like(self.router.centre) if centre is None else centre)
        self.router.centred = True

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors and, routed by sequence, the centre its router was trained on."""
        state = super().state_dict()
        if self.router is not None:
            self.ensure_centre()
            state[CENTRE] = self.router.centre.detach().float().cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        centre = state.pop(CENTRE, None)
        super().load_state_dict(state)
        if self.router is not None:
            self.set_centre(centre)

    @contextlib.contextmanager
    def rows(self, ids: torch.Tensor, mask: torch.Tensor, repeats: int = 1):
        """Forwards inside run `repeats` sequences of each prompt (`ids`, `mask`: left-padded), each at its gates:
        the router on the mean of the base model's final hidden states over the prompt's tokens (prompt_feature),
        once per sequence (its statistics and balance term count sequences). Unless a checkpoint or a file has
        set it, the first call sets the router's centre from the training prompts the policy attached with, on
        the device the model runs on (in training: the loop's setup, before a resume loads its own)."""
        if any(layer.use_reference for layer in self.layers.values()):  # π_ref's forwards: no routing
            yield
            return
        self.ensure_centre()
        gates = self.router(prompt_features(self.model, ids, mask).repeat_interleave(repeats, 0))
        self.note_top1(ids, mask, gates[::repeats])
        for layer in self.layers.values():
            layer.row_gates = gates
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.row_gates = None

    def centre(self, name: str) -> float:
        return 1.0 if name.endswith(".experts") else 0.0  # decayed experts go towards the base (z = 1)

    def reference(self):
        return reference_mode(self.model)

    def saved_args(self) -> dict:
        """The experts as recorded in the file: their paths, SHA-256 and tasks (their vectors are in it)."""
        import dataclasses

        return {**dataclasses.asdict(self.args), "expert_files": self.expert_files}

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """Every router (a sequence router with its centre), and every expert's z (trained or not): the file
        alone rebuilds the mixture."""
        if self.router is not None:
            self.ensure_centre()
        tensors = {f"{name}.{part}": tensor for name, layer in self.layers.items()
                   for part, tensor in saved_parts(layer)}
        tensors.update(self.sequence_router_state())
        return {name: tensor.detach().float().cpu().clone() for name, tensor in tensors.items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor], path) -> None:
        mine = {f"{name}.{part}": tensor for name, layer in self.layers.items() for part, tensor in saved_parts(layer)}
        mine.update(self.sequence_router_state())
        if CENTRE in mine and CENTRE not in tensors:  # written before routers were centred
            del mine[CENTRE]
            self.set_centre(None)
        with torch.no_grad():
            for key, tensor in mine.items():
                if key not in tensors or tensors[key].shape != tensor.shape:
                    raise PolicyError(f"{path} does not fit this mixture: {key} is missing or of another shape")
                tensor.copy_(tensors[key])
        if CENTRE in mine:
            self.router.centred = True

    def memory(self, targets: list[tuple[str, int, int]], b: int) -> dict:
        """Factors instead of each W (U, s, Vᵀ less W), K expert vectors, a router per layer (or one)."""
        k = len(self.experts)
        ranks = sum(min(o, i) for _, o, i in targets)
        factors = sum(o * min(o, i) + min(o, i) + min(o, i) * i - o * i for _, o, i in targets)
        routers = (k + 1) * (sum(i + 1 for _, _, i in targets) if self.args.routing == "token"
                             else min(i for _, _, i in targets) + 1)  # sequence: one router on the hidden size
        trainable = routers + (k * ranks if self.args.train_experts else 0)
        frozen = factors * b + (0 if self.args.train_experts else k * ranks * 4)
        return {"trainable": trainable, "frozen_bytes": frozen, "rank": max(min(o, i) for _, o, i in targets)}


@torch.no_grad()
def prompt_features(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A sequence router's first pass: the base model (z = 1) over left-padded prompts, read by prompt_feature."""
    with reference_mode(model):
        hidden = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       use_cache=False, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    return prompt_feature(hidden, mask)


def prompt_feature(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What a sequence router reads: the mean of the final hidden states over the prompt's tokens (fp32)."""
    weights = mask[..., None].float()
    return (hidden.float() * weights).sum(1) / weights.sum(1).clamp_min(1)


def mean_prompt_feature(model: nn.Module, prompts: list[list[int]], batch: int = 16) -> torch.Tensor:
    """The mean of prompt_feature over these prompts (token ids), on the model's device."""
    from svf_rl.engines.hf import left_pad

    device, total = next(model.parameters()).device, 0
    for start in range(0, len(prompts), batch):
        ids, mask = left_pad(prompts[start:start + batch], 0)
        total = total + prompt_features(model, ids.to(device), mask.to(device)).sum(0)
    return total / len(prompts)


class PromptRouter(Router):
    """routing=sequence's router. It reads a prompt's pooled state less `centre`, the mean over training prompts,
    at unit length. The centre removes what every prompt shares (the chat template, the system prompt), which
    is most of each mean: on the three adaptation tasks, the tasks' mean directions differ by 0.39 uncentred
    and 1.73 centred, against 0.06 and 0.30 within a task. Unit length makes an Adam step of lr move a logit
    by at most lr·√d whatever the model's hidden scale (unscaled, one step at 1e-2 moved SmolLM2's logits by
    several units: the router collapsed in 10 steps). `centred`: whether the centre is set (computed or read)."""

    def __init__(self, hidden_size: int, options: int, top_k: int = 0, balance: float = 0.0):
        super().__init__(hidden_size, options, top_k, balance)
        self.per_sequence = True
        self.register_buffer("centre", torch.zeros(hidden_size))
        self.centred = True  # a policy in training clears it until its first pass computes the centre

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        keep_fp32([*self.parameters(), self.centre])
        return self

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return super().forward(F.normalize(pooled.float() - self.centre, dim=-1))


def rows_of(gates: torch.Tensor, rows: int) -> torch.Tensor:
    """The gates of a forward's `rows`, from one row per prompt or one per sequence: rows come in groups of one
    prompt's completions (a shared prompt's forward has one row per group; a generation n per prompt)."""
    if rows == len(gates):
        return gates
    if len(gates) % rows == 0:
        return gates[::len(gates) // rows]
    if rows % len(gates) == 0:
        return gates.repeat_interleave(rows // len(gates), 0)
    raise RuntimeError(f"a forward of {rows} rows under the gates of {len(gates)} prompts")


SEQUENCE_ROUTER = "sequence_router"  # routing=sequence: the router's module name in the model
CENTRE = f"{SEQUENCE_ROUTER}.centre"


def saved_parts(layer: MixtureLinear) -> list[tuple[str, torch.Tensor]]:
    router = [] if layer.router is None else [("router.weight", layer.router.weight),
                                              ("router.bias", layer.router.bias)]
    return [*router, ("experts", layer.experts)]


def read_experts(paths: list[str], targets: str) -> list:
    """The experts, read and checked against each other and the targets, in one line each, before a model loads."""
    from svf_rl.inference.expert import ExpertError, load_expert

    experts = []
    for path in paths:
        try:
            experts.append(load_expert(path))
        except ExpertError as err:
            raise PolicyError(f"policy_args.experts: {err}") from None
    first = experts[0]
    for path, expert in zip(paths, experts, strict=True):
        if expert.targets != targets:
            raise PolicyError(f"policy_args.experts: {path} was trained with targets {expert.targets!r}, this run "
                              f"targets {targets!r}")
        if expert.base_fingerprint != first.base_fingerprint or set(expert.vectors) != set(first.vectors):
            raise PolicyError(f"policy_args.experts: {path} and {paths[0]} were trained on other base weights or "
                              f"layers; a mixture needs experts of one base model")
    return experts


def expert_labels(paths: list[str], experts: list) -> list[str]:
    """Each expert's task (or file stem), made unique."""
    labels = []
    for path, expert in zip(paths, experts, strict=True):
        label = expert.task or Path(path).stem
        labels.append(label if label not in labels and label != "base" else f"{label}{len(labels) + 1}")
    return labels

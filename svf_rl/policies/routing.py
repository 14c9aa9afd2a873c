"""Soft routing, shared by the mixture policies (mixture, hydralora, molora): per token, or per sequence (a
mixture's `routing=sequence`, whose one router sees each sequence once: its positions are sequences).

Each adapted layer has its own router, an affine map of the layer's input to one logit per option, as in MoV and
MoLoRA: gates = softmax(R x + b). With top-k only the k largest are kept and the others set to 0, not
renormalised (as in Switch): the dropped share adds nothing, which is the base model, and a top-1 gate keeps
its gradient (renormalised, it would be 1 whatever the router). R and b start at zero, so every option starts
with an equal share, unless `random_init` (routed LoRA experts: they all start at B = 0, so a router at zero gives
them equal gates and equal gradients, and with HydraLoRA's shared A they would stay identical for ever; a random
router, like nn.Linear's default, breaks that symmetry as HydraLoRA's and MoLoRA's own code does).

The load-balancing term is Switch Transformer's, per layer and forward: n · Σₖ fₖ Pₖ over that forward's
tokens, where fₖ is the share of them whose largest probability is option k (no gradient) and Pₖ the mean
probability (before top-k); it is 1 when routing is uniform. Padding is not a token: the model's attention
mask tells the routers which positions are (watch_positions), and padding gets no gradient from the term and
no count in the statistics. Each forward's term is weighted by its share of the step's tokens and the layers
are averaged, so a step adds up to a token-weighted mean (per rank under DDP,
as Switch computes it per device). Its gradient joins the loss's through the probabilities themselves (a
pass-through whose backward adds it, multiplied as the backend multiplies the loss: fp16's loss scale,
DeepSpeed's rank count). fₖ is per forward, so the term depends on how the step is split into forwards
(micro-batches, a group's shared prompt), as Switch's depends on its batches. It is a penalty on the router
at the sampled tokens, not a reward: its gradient is the term's own gradient there, and the tokens' dependence
on the router (which REINFORCE's score function would carry) is not part of it, as in supervised MoE training.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


class _AddGradient(torch.autograd.Function):
    """Identity forward; backward adds a constant gradient (the balance term's ∂/∂gates)."""

    @staticmethod
    def forward(ctx, gates, extra):
        ctx.save_for_backward(extra)
        return gates.view_as(gates)

    @staticmethod
    def backward(ctx, grad):
        (extra,) = ctx.saved_tensors
        return grad + extra, None


class Router(nn.Module):
    def __init__(self, in_features: int, options: int, top_k: int = 0, balance: float = 0.0,
                 random_init: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(options, in_features))
        if random_init:
            bound = in_features ** -0.5  # nn.Linear's default
            nn.init.uniform_(self.weight, -bound, bound)
        self.bias = nn.Parameter(torch.zeros(options))
        self.top_k, self.balance = top_k, balance
        self.per_sequence = False  # routes whole sequences: one position per sequence
        self.step_tokens = 0  # positions the optimiser step forwards (set in its scope); 0: this forward's
        self.layers = 1  # routed layers in the model: the balance term is their mean
        self.loss_scale = 1.0  # what the backend multiplies the loss by (set in the step's scope)
        self.row_sources: list[str | None] | None = None  # each sequence's source task (set in the update)
        self.row_routes: tuple[torch.Tensor, torch.Tensor] | None = None  # its rollout routes (set in the update)
        self.kept: list | None = None  # each forward's top-1 options and tokens while generating (keep_routes)
        self.positions: dict[tuple, torch.Tensor | None] = {}  # the model's forwards' masks (watch_positions)
        self.stats: dict[str, torch.Tensor] = {}  # by phase, and "update/<source>"

    @property
    def options(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., options] fp32 gates for each position of x [..., in]."""
        probs = F.linear(x.float(), self.weight.float(), self.bias.float()).softmax(-1)
        flat = probs.detach().reshape(-1, self.options)
        choice = flat.argmax(-1)
        top1 = F.one_hot(choice, self.options).float()
        tokens = self.tokens_of(probs.shape[:-1])  # [positions] 1 at a token, 0 at padding
        if self.balance > 0 and torch.is_grad_enabled() and self.weight.requires_grad:
            count = tokens.sum().clamp_min(1)  # a tensor: no device sync
            share = (top1 * tokens[:, None]).sum(0) / count  # fₖ
            world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
            # ∂(n Σ fₖ Pₖ)/∂probs[t, k] = n fₖ / T at each token t; the step's T and the layer mean, summed over ranks
            scale = (self.balance * self.loss_scale * self.options
                     / (count.clamp_min(self.step_tokens) * self.layers * world))
            extra = (scale * share * tokens[:, None]).view_as(probs)
            probs = _AddGradient.apply(probs, extra)
        gates = probs
        if 0 < self.top_k < self.options:
            kept = probs.topk(self.top_k, -1).indices
            gates = probs * torch.zeros_like(probs).scatter_(-1, kept, 1.0)
        phase = "update" if torch.is_grad_enabled() else "rollout"
        rows = probs.shape[0] if probs.dim() > 1 else 1
        self.record(flat, top1, tokens, phase, self.sources_of(rows))
        if self.kept is not None and phase == "rollout":
            self.kept.append((choice.view(rows, -1).to(torch.uint8), tokens.view(rows, -1)))
        if self.row_routes is not None and phase == "update":
            self.compare(choice.view(rows, -1), tokens.view(rows, -1))
        return gates

    def tokens_of(self, shape: torch.Size) -> torch.Tensor:
        """[positions]: 1 where a position of this shape is a token, 0 where it is padding, from the attention mask
        of the model's forward of that shape (all 1 without one, and for a router of whole sequences)."""
        mask = None if self.per_sequence else self.positions.get(tuple(shape))
        if mask is None:
            return torch.ones(shape.numel(), device=self.weight.device)
        return mask.reshape(-1).to(self.weight.device, torch.float32)

    def sources_of(self, rows: int) -> list[str | None] | None:
        """The source of each of a forward's rows: one per sequence, or one per group of a prompt's sequences (a
        shared prompt's forward)."""
        sources = self.row_sources
        if not sources or not any(sources) or len(sources) % rows:
            return None
        return sources[::len(sources) // rows]

    @torch.no_grad()
    def compare(self, choice: torch.Tensor, tokens: torch.Tensor) -> None:
        """Counts the tokens of this update forward ([rows, positions]) whose top-1 option is the one they had when
        sampled. A forward's rows are its sequences, or one per group of them (a shared prompt's forward); a row's
        tokens are its prompt's then its completion's, or its completion's alone (the shared prompt's completion
        forward: as many tokens as the completion at most)."""
        routes, prompts = self.row_routes  # [sequences, fed tokens] (-1 past the end), [sequences]
        rows = choice.shape[0]
        if routes.shape[0] % rows:
            return
        step = routes.shape[0] // rows
        routes, prompts = routes[::step], prompts[::step]
        fed = (routes >= 0).sum(1)  # the prompt's tokens and the completion's but its last
        order = (tokens.cumsum(1) - 1).long()  # each position's place among its row's tokens
        completion_only = (tokens.sum(1) <= fed - prompts + 1) if step == 1 else torch.zeros_like(fed, dtype=bool)
        place = order + torch.where(completion_only, prompts, 0)[:, None]
        expected = routes.gather(1, place.clamp(0, routes.shape[1] - 1))
        seen = (tokens > 0) & (place < fed[:, None])
        counts = torch.stack([((choice == expected) & seen).sum(), seen.sum()])
        self.stats["agreement"] = counts if "agreement" not in self.stats else self.stats["agreement"] + counts

    @torch.no_grad()
    def record(self, probs: torch.Tensor, top1: torch.Tensor, tokens: torch.Tensor, phase: str,
               sources: list | None = None) -> None:
        """Sums over the tokens (`tokens`: 1, or 0 at padding) of gates, top-1 counts, entropy, and the tokens
        themselves: for the phase, and with `sources` (one per row of positions) for each source too."""
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
        per_position = torch.cat([probs, top1, entropy[:, None], torch.ones_like(entropy)[:, None]], -1)
        per_position = per_position * tokens[:, None]
        sums = {phase: per_position.sum(0)}
        if sources:
            per_row = per_position.view(len(sources), -1, per_position.shape[-1]).sum(1)
            for source in {s for s in sources if s}:
                rows = [i for i, s in enumerate(sources) if s == source]
                sums[f"{phase}/{source}"] = per_row[rows].sum(0)
        for key, new in sums.items():
            self.stats[key] = new if key not in self.stats else self.stats[key] + new


def watch_positions(model: nn.Module) -> None:
    """The routers of `model` learn which positions of each forward are tokens, from the attention mask it is
    called with (the last `len` columns: a cached forward's mask covers the past too). Kept per input shape, so
    that a checkpointed layer recomputed in the backward finds its forward's mask."""
    table: dict[tuple, torch.Tensor | None] = {}

    def note(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        ids = kwargs.get("inputs_embeds") if ids is None else ids
        if ids is None or ids.dim() < 2:
            return
        shape, mask = tuple(ids.shape[:2]), kwargs.get("attention_mask")
        table.pop(shape, None)  # a mask that is not [rows, ≥ len] (none, 4-D, a dict of them): every position counts
        plain = isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] >= shape[1]
        table[shape] = mask[:, -shape[1]:].detach() if plain else None
        while len(table) > 8:  # the last forwards' shapes
            table.pop(next(iter(table)))

    for router in routers(model):
        router.positions = table
    model.register_forward_pre_hook(note, with_kwargs=True)


def token_routers(model: nn.Module) -> list[Router]:
    return [r for r in routers(model) if not r.per_sequence]


@contextlib.contextmanager
def keep_routes(model: nn.Module):
    """Generation inside keeps each token router's top-1 option at every position it forwards. Yields
    routes(row, length) → [routers, length] uint8 on the CPU: the options of the row's first `length` tokens
    (its prompt's, then what was fed of its completion), None when no router ran. A forward of fewer rows (a
    prompt's shared prefill) stands for each of its rows' sequences."""
    layers = token_routers(model)
    for router in layers:
        router.kept = []
    kept, table = [router.kept for router in layers], {}

    def routes(row: int, length: int) -> torch.Tensor | None:
        if "top1" not in table:
            forwards = list(zip(*kept, strict=False))  # per forward, each router's (options, tokens)
            rows = forwards[-1][0][0].shape[0] if forwards else 0
            if not rows or len(set(map(len, kept))) > 1 or any(rows % len(f[0][0]) for f in forwards):
                table["top1"] = None
            else:
                table["top1"] = torch.cat([torch.stack([c for c, _ in f]).repeat_interleave(rows // len(f[0][0]), 1)
                                           for f in forwards], 2).cpu()  # [routers, rows, positions]
                table["tokens"] = torch.cat([f[0][1].repeat_interleave(rows // len(f[0][1]), 0)
                                             for f in forwards], 1).cpu() > 0
        if table["top1"] is None:
            return None
        return table["top1"][:, row, table["tokens"][row]][:, :length].clone()

    try:
        yield routes
    finally:
        for router in layers:
            router.kept = None


def sampled_routes(completions: list, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """([routers, sequences, fed tokens] with -1 past each one's end, [sequences] prompt lengths): the
    completions' rollout routes, or None where one has none."""
    kept = [getattr(c, "routes", None) for c in completions]
    if not kept or any(r is None for r in kept) or len({r.shape[0] for r in kept}) > 1:
        return None
    routes = torch.full((kept[0].shape[0], len(kept), max(r.shape[1] for r in kept)), -1, dtype=torch.long)
    for i, r in enumerate(kept):
        routes[:, i, :r.shape[1]] = r
    prompts = torch.tensor([len(c.prompt_ids) for c in completions])
    return routes.to(device), prompts.to(device)


def keep_fp32(params) -> None:
    """After model.to(dtype): adapter and router tensors stay fp32, or their small updates round away."""
    for param in params:
        if param.dtype != torch.float32:
            param.data = param.data.float()


def routers(model: nn.Module) -> list[Router]:
    return [m for m in model.modules() if isinstance(m, Router)]


def set_step(model: nn.Module, tokens: int, loss_scale: float = 1.0, sequences: int = 0) -> None:
    layers = routers(model)
    for router in layers:
        router.step_tokens = sequences if router.per_sequence else tokens
        router.layers, router.loss_scale = len(layers), loss_scale


def routing_metrics(model: nn.Module, labels: list[str]) -> dict[str, float]:
    """Since the last call, over every routed layer: the mean routing entropy (nats), each option's mean gate
    (`route_share/...`) and share of top-1 choices in the update, the same for each source task of the update's
    sequences (`route_share/<source>/...`: a mixed task), the same shares in the rollouts, and the Switch
    balance term n Σ fₖ Pₖ (1 = uniform). Resets the counts."""
    out: dict[str, float] = {}
    layers = routers(model)
    if not layers:
        return out
    n = layers[0].options
    keys = sorted({key for r in layers for key in r.stats if key.startswith("update/")})
    for key in ("update", "rollout", *keys):
        sums = [r.stats[key] for r in layers if key in r.stats]
        if not sums:
            continue
        per_layer = torch.stack(sums)  # [layers, 2n + 2]
        positions = per_layer[:, -1:].clamp_min(1)
        mean_gate, top1 = per_layer[:, :n] / positions, per_layer[:, n:2 * n] / positions
        entropy = (per_layer[:, 2 * n] / positions[:, 0]).mean().item()
        if key == "rollout":
            prefix, suffix = "route_rollout", ""
        else:
            prefix, suffix = "route", key.removeprefix("update").replace("/", "", 1)
        out[f"{prefix}_entropy{'/' + suffix if suffix else ''}"] = entropy
        for k, label in enumerate(labels):
            where = f"{suffix}/{label}" if suffix else label
            out[f"{prefix}_share/{where}"] = mean_gate[:, k].mean().item()
            out[f"{prefix}_top1/{where}"] = top1[:, k].mean().item()
        if key == "update":
            out["route_balance"] = (n * (mean_gate * top1).sum(1)).mean().item()
    counts = [r.stats["agreement"] for r in layers if "agreement" in r.stats]
    if counts:  # token routing: the update's tokens whose top-1 option is the one they had when sampled
        agree, seen = torch.stack(counts).sum(0).tolist()
        if seen:
            out["route_agreement"] = agree / seen
    for router in layers:
        router.stats.clear()
    return out


FORMAT = "svf-rl-routed"  # a routed policy's file: its tensors by name, what it is in the metadata


class RoutedPolicy:
    """What the routed policies share: their layers' trainable tensors by name, the routers' step scope and
    statistics, and one safetensors file. A subclass attaches its layers (`self.layers`: name → module), names
    its options (`labels`) and its π_ref."""

    artefact = "mixture.safetensors"
    starts_at_base = True  # every B at 0 (a mixture of trained experts does not)
    checkpoint_key = "routed"
    labels: list[str]

    def __init__(self, config):
        from svf_rl.policies.base import PolicyError

        if config.engine != "hf" and not self.runs_on_vllm(config):
            raise PolicyError(f"policy {config.policy!r} {self.routes(config)}, which vLLM engines do not run; use "
                              f"engine=hf")
        self.targets, self.model, self.layers, self.sharded = config.targets, None, {}, False

    def routes(self, config) -> str:
        return "routes each token inside its layers"

    @classmethod
    def runs_on_vllm(cls, config) -> bool:
        """Whether vLLM engines can generate from it: only weights fixed for a whole sequence can be pushed."""
        return False

    def named_parameters(self) -> dict[str, nn.Parameter]:
        return {f"{layer_name}.{name}": p for layer_name, layer in self.layers.items()
                for name, p in layer.named_parameters() if p.requires_grad}

    def parameters(self) -> list[nn.Parameter]:
        return list(self.named_parameters().values())

    @classmethod
    def from_file(cls, config, tensors: dict, info: dict):
        """The policy a saved file describes (`config`: its policy, arguments and targets)."""
        return cls(config)

    def centre(self, name: str) -> float:
        """What weight decay pulls a tensor towards (0: a router's uniform gates, a LoRA expert's no change)."""
        return 0.0

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        groups: dict[float, list] = {}
        for name, param in self.named_parameters().items():
            groups.setdefault(self.centre(name), []).append(param)
        return [{"params": params, "lr": lr, "weight_decay": weight_decay, "centre": centre}
                for centre, params in groups.items()]

    def optimizer(self, optimizer_class, lr: float, weight_decay: float, **kwargs):
        return optimizer_class(self.param_groups(lr, weight_decay), **kwargs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().float().cpu().clone() for name, p in self.named_parameters().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from svf_rl.policies.base import PolicyError

        params = self.named_parameters()
        if set(state) != set(params):
            missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
            raise PolicyError(f"the {self.name} state does not match this policy's tensors ("
                              f"{len(missing)} missing, e.g. {missing[:1]}; {len(extra)} unknown, e.g. {extra[:1]})")
        with torch.no_grad():
            for name, value in state.items():
                if value.shape != params[name].shape:
                    raise PolicyError(f"{name}: shape {tuple(value.shape)}, this policy's is "
                                      f"{tuple(params[name].shape)}")
                params[name].copy_(value)

    @contextlib.contextmanager
    def step(self, tokens: int, gather_per_step: bool, loss_scale: float = 1.0, sequences: int = 0,
             unpadded: int = 0):
        """The balance term is scaled by the step's tokens (padding excluded), or its sequences for a router that
        routes whole sequences (each micro-batch adds its share)."""
        set_step(self.model, unpadded or tokens, loss_scale, sequences)
        try:
            yield
        finally:
            set_step(self.model, 0)

    @contextlib.contextmanager
    def sequences(self, completions: list):
        """The routers keep their statistics per source task too, and token routers compare each token's top-1
        option with the one it had when sampled (routing_metrics)."""
        layers, sources = routers(self.model), [c.source for c in completions]
        tokens = token_routers(self.model)
        kept = sampled_routes(completions, tokens[0].weight.device) if tokens else None
        for router in layers:
            router.row_sources = sources
        for k, router in enumerate(tokens if kept is not None and kept[0].shape[0] == len(tokens) else []):
            router.row_routes = kept[0][k], kept[1]
        try:
            yield
        finally:
            for router in layers:
                router.row_sources, router.row_routes = None, None

    def regulariser(self) -> None:
        return None  # the balance term joins through the gates (see above)

    def after_step(self, step: int) -> None:
        pass

    def engine_weights(self):
        raise NotImplementedError(f"{self.name} computes its weights per token; no engine can load them")

    def server_setup(self) -> dict:
        raise NotImplementedError(f"{self.name} computes its weights per token; no engine can load them")

    server_update = server_setup

    def metrics(self) -> dict[str, float]:
        return routing_metrics(self.model, self.labels)

    def progress(self, metrics: dict) -> str:
        return f"route H {metrics.get('route_entropy', float('nan')):.2f}"

    def shard(self) -> None:
        self.sharded = True

    def save(self, path, record: dict, scores: dict):
        """One safetensors file, written atomically: the trained tensors, and what they are in the metadata."""
        import json
        import os
        import tempfile
        from pathlib import Path

        from safetensors.torch import save_file

        path = Path(path)
        info = {"format": FORMAT, "policy": self.name, "policy_args": json.dumps(self.saved_args(), sort_keys=True),
                "labels": json.dumps(self.labels), "base_model": record["model"],
                "base_fingerprint": record["fingerprint"], "targets": self.targets, "task": record["task"],
                "config": json.dumps(record["config"], sort_keys=True, default=str),
                "scores": json.dumps(scores, sort_keys=True)}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in self.saved_tensors().items()}, tmp, metadata=info)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return path

    def saved_args(self) -> dict:
        import dataclasses

        return dataclasses.asdict(self.args)

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    def load(self, path, fingerprint: str) -> None:
        from svf_rl.policies.base import PolicyError

        tensors, info = read_routed(path)
        if info["base_fingerprint"] != fingerprint:
            raise PolicyError(f"{path} was trained on other base weights (fingerprint {info['base_fingerprint']}, "
                              f"this model's is {fingerprint})")
        self.load_tensors(tensors, path)

    def load_tensors(self, tensors: dict[str, torch.Tensor], path) -> None:
        """A saved file's tensors (read_routed's), into this policy."""
        params = self.named_parameters()
        self.load_state_dict({k: v for k, v in tensors.items() if k in params})


def read_routed(path) -> tuple[dict[str, torch.Tensor], dict]:
    """A routed policy's file: (tensors, metadata with its JSON fields parsed), or one line saying why not."""
    import json
    from pathlib import Path

    from safetensors import SafetensorError, safe_open

    from svf_rl.policies.base import PolicyError

    path = Path(path)
    if not path.is_file():
        raise PolicyError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as err:
        raise PolicyError(f"{path} is not a safetensors file: {err}") from None
    if meta.get("format") != FORMAT:
        raise PolicyError(f"{path} is not a routed policy's file (metadata format={meta.get('format')!r})")
    missing = [k for k in ("policy", "policy_args", "labels", "base_model", "base_fingerprint", "targets", "task")
               if not isinstance(meta.get(k), str)]
    if missing:
        raise PolicyError(f"{path}: metadata {missing[0]!r} is missing; not a file svf-rl wrote")
    for key, kind in (("policy_args", dict), ("labels", list), ("config", dict), ("scores", dict)):
        try:
            meta[key] = json.loads(meta.get(key, "{}"))
        except ValueError as err:
            raise PolicyError(f"{path}: metadata {key!r} is not JSON ({err})") from None
        if not isinstance(meta[key], kind):
            raise PolicyError(f"{path}: metadata {key!r} is not a JSON {kind.__name__}")
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise PolicyError(f"{path}: tensor {bad[0]!r} has non-finite values")
    return tensors, meta


def is_routed_file(path) -> bool:
    """Whether `path` is a routed policy's file (a safetensors file whose metadata says so)."""
    from pathlib import Path

    from safetensors import SafetensorError, safe_open

    if not str(path).endswith(".safetensors") or not Path(path).is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except (SafetensorError, OSError):
        return False


def routed_model(path, model_id: str, dtype: str = "auto"):
    """(model, tokenizer, policy): the base model with the routed policy of `path` attached and loaded, from the
    file alone (a mixture's experts are in it), after checking the base weights are the ones it was trained on."""
    from types import SimpleNamespace

    from svf_rl.inference.evaluate import load_model
    from svf_rl.policies import policy_class
    from svf_rl.svd import model_fingerprint

    tensors, info = read_routed(path)
    model, tokenizer = load_model(model_id, dtype)
    fingerprint = model_fingerprint(model)
    if info["base_fingerprint"] != fingerprint:
        from svf_rl.policies.base import PolicyError

        raise PolicyError(f"{path} was trained on other base weights (fingerprint {info['base_fingerprint']}); "
                          f"{model_id} has {fingerprint}")
    args = {k: v for k, v in info["policy_args"].items() if k != "expert_files"}
    config = SimpleNamespace(policy=info["policy"], policy_args=args, targets=info["targets"], engine="hf")
    policy = policy_class(info["policy"]).from_file(config, tensors, info)
    policy.attach(model)
    policy.load_tensors(tensors, path)
    for param in model.parameters():
        param.requires_grad_(False)
    return model, tokenizer, policy


def check_routed_engine(path, engine: str) -> None:
    """One line if the routed policy of `path` cannot generate on `engine` (vLLM: only a sequence router)."""
    from types import SimpleNamespace

    from svf_rl.policies import policy_class

    info = read_routed(path)[1]
    config = SimpleNamespace(policy=info["policy"], policy_args=info["policy_args"], engine=engine)
    if engine != "hf" and not policy_class(info["policy"]).runs_on_vllm(config):
        raise ValueError(f"{path} is a {info['policy']} policy that routes each token inside its layers, which "
                         f"vLLM does not run; score it with --engine hf")


@torch.no_grad()
def routing_by_group(model: nn.Module, groups: dict[str, list[tuple[list[int], list[int]]]], labels: list[str]
                     ) -> dict[str, dict]:
    """Each group's routing statistics (routing_metrics' rollout ones, without the prefix) over its (prompt,
    answer) token sequences, each run alone so that no padding is counted (a sequence router: once each)."""
    from svf_rl.engines.hf import prompt_rows

    routing_metrics(model, labels)  # forget what came before
    device = next(model.parameters()).device
    out = {}
    for name, sequences in groups.items():
        for prompt, answer in sequences:
            ids = torch.tensor([prompt], device=device)
            with prompt_rows(model, ids, torch.ones_like(ids)):
                model(input_ids=torch.tensor([prompt + answer], device=device))
        out[name] = {k.removeprefix("route_rollout_"): v for k, v in routing_metrics(model, labels).items()}
    return out

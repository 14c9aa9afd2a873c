"""SVF: W'(z) = U diag(s ⊙ z) Vᵀ for every target linear layer; only z trains."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from svf_rl.svd import cached_svd
from svf_rl.targets import find_targets

STRATEGIES = ("auto", "compose", "factored")


def compose_weight(U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """W' = U diag(s ⊙ z) Vᵀ, composed in fp32 and cast to the factors' dtype."""
    return ((U.float() * (s.float() * z)) @ Vh.float()).to(U.dtype)


def with_change(W: torch.Tensor, U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor, z: torch.Tensor
                ) -> torch.Tensor:
    """W + U diag(s ⊙ (z − 1)) Vᵀ, the change computed and added in fp32, rounded once to W's dtype: z = 1 gives W
    bit for bit. Inference (kept W) and merge both compose this way, from factors in the model's dtype."""
    return (W.float() + (U.float() * (s.float() * (z.float() - 1))) @ Vh.float()).to(W.dtype)


def cheaper_strategy(tokens: int, out: int, inp: int) -> str:
    """compose or factored, whichever costs fewer FLOPs (forward and backward) over `tokens` rows."""
    rank = min(out, inp)
    # compose: forward, input grad and weight grad of a full matmul, plus composing W' and its backward.
    compose = 6 * tokens * out * inp + 4 * out * inp * rank
    # factored: forward and input grad of two thin matmuls; z's grad is elementwise.
    factored = 4 * tokens * rank * (inp + out)
    return "compose" if compose <= factored else "factored"


class SVFLinear(nn.Module):
    """A linear layer stored as frozen SVD factors and a trainable fp32 scale z on the singular values."""

    def __init__(self, U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor, bias: torch.Tensor | None,
                 strategy: str = "auto"):
        super().__init__()
        # Frozen parameters rather than buffers, so that ZeRO-3 can shard them.
        self.U = nn.Parameter(U, requires_grad=False)
        self.s = nn.Parameter(s, requires_grad=False)
        self.Vh = nn.Parameter(Vh, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.z = nn.Parameter(torch.ones_like(s, dtype=torch.float32))
        self.strategy = strategy
        # Keep W'(z) (and W'(1) for the KL reference) for no-grad forwards: 1x the matrix each. Without them,
        # those forwards run on the factors, which costs (in + out)·r instead of in·out FLOPs per token.
        self.cache_policy, self.cache_reference = True, True
        self.use_reference = False
        self.sharded = False  # ZeRO-3: the factors exist only inside forwards, so W' is never cached
        self._policy_weight: torch.Tensor | None = None
        self._policy_z: torch.Tensor | None = None  # the z that _policy_weight was composed from
        self._reference_weight: torch.Tensor | None = None
        self._step_weight: torch.Tensor | None = None  # W'(z) during a step, as a leaf that collects ∂L/∂W'
        self.base: nn.Parameter | None = None  # inference keeps W: W' = W + U diag(s ⊙ (z − 1)) Vᵀ (keep_base)
        self.row_z: torch.Tensor | None = None  # [rows, 1, r]: each batch row's own z (per_row_z), no gradient

    def _apply(self, fn, recurse=True):
        """model.to(dtype) casts the factors, never z: its updates (about lr·1e-3) would round away in 16 bits."""
        super()._apply(fn, recurse)
        if self.z.dtype != torch.float32:
            self.z.data = self.z.data.float()
        return self

    @property
    def out_features(self) -> int:
        return self.U.shape[0]

    @property
    def in_features(self) -> int:
        return self.Vh.shape[1]

    def compose(self, z: torch.Tensor) -> torch.Tensor:
        return compose_weight(self.U, self.s, self.Vh, z)

    def compose_for_inference(self, z: torch.Tensor) -> torch.Tensor:
        """W'(z) without gradient: with W kept, W plus the change in fp32, so that z = 1 is W itself in any dtype
        (bf16 factors alone give W'(1) ≠ W) and merge, which adds the same change to W, agrees."""
        if self.base is None:
            return self.compose(z)
        return with_change(self.base, self.U, self.s, self.Vh, z)

    def choose_strategy(self, tokens: int) -> str:
        """Pick the cheaper way to get a gradient to z for a forward over `tokens` rows (FLOPs, fwd+bwd)."""
        if self.strategy != "auto":
            return self.strategy
        return cheaper_strategy(tokens, self.out_features, self.in_features)

    def weight_for_inference(self) -> torch.Tensor:
        """W' at the current z (or z = 1 in reference mode), recomposed only when z has changed since it was kept.

        Changes are found by comparing z's values (a few hundred numbers), not its version counter: optimisers
        that write z through a flat buffer or `.data` (DeepSpeed ZeRO-1/2, checkpoint loading) bump no version.
        """
        if self.use_reference:
            if self.base is not None:
                return self.base  # W itself: z = 1
            if self._reference_weight is None:
                with torch.no_grad():
                    weight = self.compose_for_inference(torch.ones_like(self.z))
                if not self.cache_reference:
                    return weight
                self._reference_weight = weight
            return self._reference_weight
        if not self.cache_policy:
            with torch.no_grad():
                return self.compose_for_inference(self.z)
        if self._policy_z is None or not torch.equal(self._policy_z, self.z.detach()):
            with torch.no_grad():
                self._policy_weight = self.compose_for_inference(self.z)
            self._policy_z = self.z.detach().clone()
        return self._policy_weight

    def begin_step(self, tokens: int) -> None:
        """One W' for every micro-batch of an optimiser step, if composing is the cheaper strategy: the W' the
        rollouts already composed at this z (when W' is kept), so the step does not compose it again."""
        if self.choose_strategy(tokens) == "compose":
            self._step_weight = self.weight_for_inference().detach().requires_grad_()

    def end_step(self) -> None:
        """Turn the accumulated G = ∂L/∂W' into ∂L/∂z = s ⊙ diag(Uᵀ G V), once, without W' itself."""
        if self._step_weight is not None and self._step_weight.grad is not None:
            grad = ((self.U.float().T @ self._step_weight.grad.float()) * self.Vh.float()).sum(1) * self.s.float()
            self.z.grad = grad if self.z.grad is None else self.z.grad + grad
        self._step_weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_z is not None:
            return self.rows_forward(x)
        trains = torch.is_grad_enabled() and self.z.requires_grad and not self.use_reference
        z = self.z if not self.use_reference else torch.ones_like(self.z)
        if not (trains or self.sharded):
            cached = self.cache_reference if self.use_reference else self.cache_policy
            if cached or self.base is not None:
                return F.linear(x, self.weight_for_inference(), self.bias)
            return self.factored(x, z.detach())
        if self._step_weight is not None and trains:
            return F.linear(x, self._step_weight, self.bias)
        if self.choose_strategy(x.numel() // x.shape[-1]) == "compose":
            return F.linear(x, self.compose(z), self.bias)
        return self.factored(x, z)

    def rows_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each batch row with its own z, one pair of thin matmuls for all of them: Wx + U((s ⊙ (z − 1)) ⊙ Vᵀx)
        with W kept, else U((s ⊙ z) ⊙ Vᵀx)."""
        scale = self.s.float() * (self.row_z - 1 if self.base is not None else self.row_z)
        out = F.linear((F.linear(x, self.Vh).float() * scale).to(x.dtype), self.U)
        if self.base is not None:
            return F.linear(x, self.base, self.bias) + out
        return out if self.bias is None else out + self.bias

    def factored(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """U (s ⊙ z ⊙ Vᵀx): the scale is applied in fp32, so that z's gradient (a sum over tokens) is fp32 too."""
        scaled = (F.linear(x, self.Vh).float() * (self.s.float() * z)).to(x.dtype)
        return F.linear(scaled, self.U, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.s.numel()}, strategy={self.strategy}"


def apply_svf(model: nn.Module, targets: str = "mlp", strategy: str = "auto",
              cache_dir: Path | None = None, progress: bool = True, keep_base: bool = False) -> list[str]:
    """Replace each target nn.Linear by an SVFLinear in place; freeze everything but z. Returns the names.
    `keep_base` (inference): each layer also keeps W, and composes W' as W plus the change (one more matrix)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"forward strategy {strategy!r} is not one of {STRATEGIES}")
    names = find_targets(model, targets)
    for param in model.parameters():
        param.requires_grad_(False)
    from rich.progress import Progress

    with Progress(transient=True, disable=not progress) as bar:
        job = bar.add_task("SVD of target weights", total=len(names))
        for name in names:
            linear = model.get_submodule(name)
            U, s, Vh = cached_svd(linear.weight, cache_dir)
            device, dtype = linear.weight.device, linear.weight.dtype
            layer = SVFLinear(U.to(device, dtype), s.to(device, dtype), Vh.to(device, dtype), linear.bias, strategy)
            if keep_base:
                layer.base = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
            bar.advance(job)
    # Weights loaded on CPU from safetensors are views of the mapped file, which stays mapped, and the replaced
    # weights' pages resident, while any view lives: copies of the kept ones let the file go.
    factors = {id(p) for layer in svf_layers(model).values() for p in layer.parameters()}
    with torch.no_grad():
        for param in model.parameters():
            if param.device.type == "cpu" and id(param) not in factors:
                param.data = param.data.clone()
    return names


WEIGHT_CACHES = ("all", "policy", "none")


def set_weight_cache(model: nn.Module, cache: str) -> None:
    """Which composed weights the layers keep for no-grad forwards: W'(z) and W'(1) ("all"), W'(z) alone
    ("policy"; reference forwards run on the factors) or none (every no-grad forward runs on the factors)."""
    if cache not in WEIGHT_CACHES:
        raise ValueError(f"weight cache {cache!r} is not one of {WEIGHT_CACHES}")
    for layer in svf_layers(model).values():
        layer.cache_policy, layer.cache_reference = cache != "none", cache == "all"
        if not layer.cache_policy:
            layer._policy_weight = layer._policy_z = None
        if not layer.cache_reference:
            layer._reference_weight = None


def svf_layers(model: nn.Module) -> dict[str, SVFLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SVFLinear)}


def z_vectors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The expert: module name → z (a detached fp32 copy)."""
    return {n: m.z.detach().float().cpu().clone() for n, m in svf_layers(model).items()}


def load_z(model: nn.Module, vectors: dict[str, torch.Tensor]) -> None:
    """Copy z vectors into the model in place (bumps z's version, so cached W' recompose)."""
    layers = svf_layers(model)
    with torch.no_grad():
        for name, z in vectors.items():
            layers[name].z.copy_(z)


@contextlib.contextmanager
def policy_step(model: nn.Module, tokens: int, compose_once: bool = True) -> Iterator[None]:
    """Scope of one optimiser step over `tokens` rows: layers that compose do it once; z.grad is set on exit.

    With compose_once=False each forward builds its own graph to z, so z's gradient arrives in each backward.
    """
    layers = list(svf_layers(model).values()) if compose_once else []
    for layer in layers:
        layer.begin_step(tokens)
    try:
        yield
        for layer in layers:
            layer.end_step()
    finally:
        for layer in layers:
            layer._step_weight = None


@contextlib.contextmanager
def per_row_z(model: nn.Module, rows: list[dict[str, torch.Tensor] | None]) -> Iterator[None]:
    """Forwards whose batch row i runs at z = rows[i] (None: the base model, z = 1): several experts in one batch,
    each layer scaling Vᵀx per row (exact per-request experts, as they all share U and V)."""
    layers = svf_layers(model)
    for name, layer in layers.items():
        layer.row_z = torch.stack([torch.ones_like(layer.z) if z is None else z[name].to(layer.z)
                                   for z in rows]).detach()[:, None, :]
    try:
        yield
    finally:
        for layer in layers.values():
            layer.row_z = None


@contextlib.contextmanager
def reference_mode(model: nn.Module) -> Iterator[None]:
    """Run forwards as the base model (z = 1) without a second copy of the model."""
    layers = list(svf_layers(model).values())
    for layer in layers:
        layer.use_reference = True
    try:
        yield
    finally:
        for layer in layers:
            layer.use_reference = False


def apply_expert(model: nn.Module, expert, fingerprint: str) -> None:
    """Load an expert's z into an SVF model after checking names, sizes and the base fingerprint."""
    from svf_rl.inference.expert import scale_vectors

    layers = svf_layers(model)
    expert.check_compatible({name: layer.z.numel() for name, layer in layers.items()}, fingerprint)
    load_z(model, scale_vectors(expert, lambda name: layers[name].s))

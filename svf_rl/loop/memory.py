"""Peak memory of the trainer, predicted from the configuration, phase by phase.

Everything the trainer holds is counted from shapes: the model's parameters (read off a meta-device copy of
the architecture, so nothing is allocated), the SVD factors, z and AdamW, the kept W', and for each phase
what lives only in it: generation's key/value cache, the activations autograd saves in the update, the
vocabulary rows of the head, and the transients of one layer. The activation count follows the
Llama-family decoder layer (RMSNorm, grouped-query SDPA attention, gated MLP: Llama, Mistral, Qwen2/3,
SmolLM); tests/test_memory.py checks it byte for byte against what autograd saves, and
benchmarks/bench_memory.py against measured peaks. Not counted: the CUDA context and the allocator's
fragmentation (reserved minus allocated), and the Python runtime.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

GiB = 2**30
ZERO3_LIVE_PARAMETERS = 10**9  # DeepSpeed's default stage3_max_live_parameters


@dataclass
class Shapes:
    """What the estimate needs to know about the architecture and the SVF targets."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    params: int  # every parameter, tied ones once
    targets: list[tuple[str, int, int]]  # (name, out, in) of each SVF matrix

    @classmethod
    def of(cls, model_config, targets: str) -> Shapes:
        from transformers import AutoModelForCausalLM

        from svf_rl.targets import find_targets

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config)
        text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        names = find_targets(model, targets)
        shapes = [(n, *model.get_submodule(n).weight.shape) for n in names]
        params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
        return cls(text.num_hidden_layers, text.hidden_size, text.intermediate_size, heads,
                   getattr(text, "num_key_value_heads", None) or heads, head_dim, text.vocab_size, params, shapes)


@dataclass
class MemoryEstimate:
    resident: dict[str, int]  # bytes held for the whole run
    phases: dict[str, dict[str, int]]  # bytes held only during each phase, on top of the resident ones
    vllm: int = 0  # a colocated vLLM's own share
    notes: list[str] = field(default_factory=list)

    def phase_peak(self, phase: str) -> int:
        held = sum(v for k, v in self.resident.items() if not (phase == "SVD" and k.startswith("kept")))
        return held + sum(self.phases[phase].values())  # the kept W' are composed after the SVD

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_peak)

    @property
    def peak(self) -> int:
        """The trainer's predicted peak, vLLM's share not included."""
        return self.phase_peak(self.peak_phase)


def layer_saved(shapes: Shapes, dtype: torch.dtype, layer_targets: list[tuple[str, int, int]],
                strategy: dict[str, str], first_layer: bool, adapter_rank: int | None = None) -> tuple[float, float]:
    """Bytes autograd saves in one decoder layer's forward toward z: (per query token, per key token).

    RMSNorm keeps its input in fp32 and one fp32 rsqrt per token; SDPA keeps q, the keys and values (repeated
    to every query head), its output and an fp32 log-sum-exp per head; the gated MLP keeps the gate's output,
    its activation and the up projection's output. Frozen linear layers keep nothing. An SVF matrix keeps its
    fp32 Vᵀx (factored) or its input (compose; q, k and v share theirs, as gate and up do, and o_proj's is the
    attention output). Nothing upstream
    of the first layer's MLP depends on z unless its attention is targeted, so that layer keeps its MLP's only.
    A LoRA-style adapter of rank r (`adapter_rank`) keeps its input for A's gradient (its own fp32 copy when the
    model is in 16 bits, else the shared one) and the fp32 rank-r activation for B's.
    """
    b = torch.finfo(dtype).bits // 8
    d, f, q = shapes.hidden, shapes.intermediate, shapes.heads * shapes.head_dim
    mlp = ("gate_proj", "up_proj", "down_proj")
    attention_targeted = any(name.rsplit(".", 1)[-1] not in mlp for name, _, _ in layer_targets)
    grad_before_attention = not first_layer or attention_targeted
    per_query, per_key = 3 * f * b, 0.0  # gate output, activation, up output
    if grad_before_attention:
        norms = 1 if first_layer else 2  # the first layer's input, the embeddings, needs no gradient
        per_query += norms * (d * 4 + 4) + 2 * q * b + shapes.heads * 4  # norms' fp32 input, rsqrt; q, output; lse
        per_key += 2 * q * b  # keys and values, repeated to every query head
    # o_proj's input is a view of the attention output, which is kept already.
    inputs = {"gate_proj": ("mlp", d), "up_proj": ("mlp", d), "down_proj": ("mid", f), "o_proj": ("o", 0)}
    kept: set[str] = set()
    for name, out, inp in layer_targets:
        kind = name.rsplit(".", 1)[-1]
        if adapter_rank is not None:
            per_query += adapter_rank * 4
            if b < 4:
                per_query += inp * 4
                continue
        elif strategy[name] == "factored":
            per_query += min(out, inp) * 4
            continue
        source, width = inputs.get(kind, ("qkv", d))
        if source not in kept and (source != "qkv" or grad_before_attention):
            kept.add(source)
            per_query += width * b
    return per_query, per_key


def saved_activations(shapes: Shapes, dtype: torch.dtype, strategy: dict[str, str],
                      passes: list[tuple[int, int, int]], checkpointed: bool = False,
                      adapter_rank: int | None = None) -> tuple[int, int]:
    """Bytes autograd keeps over the forwards `passes` of (rows, query length, key length) until backward, and
    the most one layer's recomputation and gradients add during backward."""
    b = torch.finfo(dtype).bits // 8
    by_layer: dict[int | None, list] = {}
    for target in shapes.targets:
        by_layer.setdefault(_layer_index(target[0]), []).append(target)
    layers = [layer_saved(shapes, dtype, by_layer.get(i, []), strategy, i == 0, adapter_rank)
              for i in range(shapes.layers)]
    kept, one_layer = 0.0, 0.0
    for rows, query, key in passes:
        queries = rows * query
        per_layer = [per_query * queries + per_key * rows * key for per_query, per_key in layers]
        if checkpointed:  # each layer keeps its input (the first's needs no gradient)
            kept += (shapes.layers - 1) * shapes.hidden * b * queries
        else:
            kept += sum(per_layer)
        kept += (shapes.hidden * 4 + 4) * queries  # the final norm
        kept += rows * query * (key * b + 2 * shapes.head_dim * b)  # the attention mask, rotary cos and sin
        one_layer += max(per_layer)
    return int(kept), int(one_layer)


def compose_saved(out: int, inp: int, dtype: torch.dtype, input_grad: bool = True) -> int:
    """Bytes autograd keeps for a W' composed inside a forward (under DeepSpeed, once per forward): W' itself for
    the input's gradient (`input_grad`), and, for 16-bit factors, the fp32 copies of U and Vᵀ that z's gradient
    needs (fp32 factors are kept by reference; sharded ones are gathered again for backward)."""
    r, b = min(out, inp), torch.finfo(dtype).bits // 8
    return (out * inp * b if input_grad else 0) + ((out * r + r * inp) * 4 if b < 4 else 0)


def input_needs_grad(name: str, targets: list[tuple[str, int, int]]) -> bool:
    """Whether a target's input depends on z: not in the first layer before anything targeted has run (its
    attention reads the embeddings; its MLP too, unless its attention is targeted)."""
    if _layer_index(name) != 0:
        return True
    kind = name.rsplit(".", 1)[-1]
    if kind in ("q_proj", "k_proj", "v_proj"):
        return False
    mlp = ("gate_proj", "up_proj", "down_proj")
    attention = any(_layer_index(n) == 0 and n.rsplit(".", 1)[-1] not in mlp for n, _, _ in targets)
    return kind not in ("gate_proj", "up_proj") or attention


def estimate_memory(config, model_config, dtype: torch.dtype, device: torch.device | str = "cpu",
                    prompt_tokens: int = 64, processes: int = 1, shapes: Shapes | None = None,
                    zero_stage: int | None = None,
                    zero3_live_parameters: int = ZERO3_LIVE_PARAMETERS) -> MemoryEstimate:
    """Predicted peak memory of one training process. `prompt_tokens`: the longest prompt, in tokens;
    `zero_stage`: DeepSpeed's ZeRO stage (0-3), None without DeepSpeed; `zero3_live_parameters`: its
    stage3_max_live_parameters."""
    from svf_rl.engines.hf import HF_BATCH_SEQUENCES
    from svf_rl.policies.svf_layer import cheaper_strategy

    shapes = shapes or Shapes.of(model_config, config.targets)
    b = torch.finfo(dtype).bits // 8
    svf = getattr(config, "policy", "svf") == "svf"
    if not svf:
        from svf_rl.policies import make_policy

        adapter = make_policy(config).memory(shapes.targets, b)
    P, C, G = prompt_tokens, config.max_new_tokens, config.generations_per_prompt
    d, V = shapes.hidden, shapes.vocab
    target_numel = sum(o * i for _, o, i in shapes.targets)
    factor_numel = sum(o * min(o, i) + min(o, i) + min(o, i) * i for _, o, i in shapes.targets)
    ranks = sum(min(o, i) for _, o, i in shapes.targets)

    sharded = zero_stage == 3  # every parameter partitioned over the processes, gathered when used
    share = processes if sharded else 1
    resident = {
        "base weights (not SVF)": (shapes.params - target_numel) * b // share,
        "U, s, Vᵀ": factor_numel * b // share,
        "z, its gradient, optimiser state": ranks * 4 * 4,
    }
    if not svf:  # the base weights whole, the adapter's parameters with fp32 gradients and AdamW's two moments
        resident = {"base weights": shapes.params * b // share,
                    "adapter parameters, gradients, optimiser state": adapter["trainable"] * 4 * 4,
                    "adapter's frozen tensors": adapter["frozen_bytes"]}
    if svf and config.weight_cache != "none" and not sharded:  # sharded factors exist only inside forwards: no W' kept
        resident["kept W'(z)"] = target_numel * b
    if svf and config.weight_cache == "all" and config.kl_coef > 0 and not sharded:
        resident["kept W'(1)"] = target_numel * b

    # The update: one micro-batch of whole prompt groups.
    prompts = config.prompts_per_step // processes
    sequences = prompts * G
    rows = max(G, config.micro_batch_size // G * G) if config.shared_prefix else config.micro_batch_size
    rows = min(rows, sequences)
    if config.shared_prefix:
        passes = [(rows // G, P, P)] + ([(rows, C - 1, P + C - 1)] if C > 1 else [])
    else:
        passes = [(rows, P + C, P + C)]
    step_tokens = (prompts * P + sequences * max(C - 1, 0)) if config.shared_prefix else sequences * (P + C)
    deepspeed = zero_stage is not None  # z's gradient must reach it inside each backward: W' per forward

    def strategy_for(tokens: int) -> dict[str, str]:
        return {name: config.forward_strategy if config.forward_strategy != "auto"
                else cheaper_strategy(tokens, out, inp) for name, out, inp in shapes.targets}

    strategy = strategy_for(max(r * q for r, q, _ in passes) if deepspeed else step_tokens)
    saved, one_layer = saved_activations(shapes, dtype, strategy, passes, config.gradient_checkpointing,
                                         None if svf else adapter["rank"])
    saved += rows * C * d * b  # the hidden states fed to the head
    tokens = sum(r * q for r, q, _ in passes)
    kv_width = 2 * shapes.kv_heads * shapes.head_dim * b
    if not svf:
        step_weights = 0
    elif deepspeed:
        step_weights = sum(compose_saved(o, i, dtype, input_needs_grad(name, shapes.targets)) for r, q, _ in passes
                           for name, o, i in shapes.targets if strategy_for(r * q)[name] == "compose")
    else:
        composed = [(o, i) for name, o, i in shapes.targets if strategy[name] == "compose"]
        step_weights = sum(o * i for o, i in composed) * b * (2 if config.weight_cache == "none" else 1)
    chunk = min(config.logit_chunk_tokens or rows * C, rows * C)
    full_kl = config.kl_coef > 0 and config.kl_estimator == "full"
    head = chunk * V * (b + 20 + (b + 8 if full_kl else 0))  # logits, fp32 copies, softmax, their gradients
    if not config.logit_chunk_tokens:
        head += rows * C * V * 4  # the whole micro-batch's log-softmax, kept for backward
    # Backward: one layer's gradients in flight, and under checkpointing its recomputed activations too; with a
    # shared prefix, one layer's prompt keys and values repeated for the completions, and their concatenation.
    layer_grads = one_layer * (2 if config.gradient_checkpointing else 1)
    if config.shared_prefix:
        layer_grads += rows * (2 * P + C - 1) * kv_width
    reference = _forward_transient(shapes, b, tokens) if config.kl_coef > 0 else 0
    update = {
        "saved activations": int(saved),
        ("W' kept by each forward (DeepSpeed)" if deepspeed else "step W' and ∂L/∂W'"): int(step_weights),
        "head, backward, reference (the largest)": int(max(head, layer_grads, reference)),
    }
    if config.shared_prefix:  # every layer's prompt keys and values, unrepeated, kept until backward
        update["shared prompts' keys and values"] = shapes.layers * (rows // G) * P * kv_width
    if config.kl_coef > 0:
        update["reference hidden states"] = rows * C * d * b
    # ZeRO-3 keeps what it gathers for repeated forwards (generation, the update's passes) until
    # stage3_max_live_parameters are whole: for models below that, every parameter; each all-gather also copies
    # this process's partitions into its send buffer (measured: 1.5× the whole model with 2 processes).
    whole = min(factor_numel + shapes.params - target_numel, zero3_live_parameters)
    gathered = {"gathered parameters (ZeRO-3)": int(whole * b * (1 + 1 / processes))} if sharded else {}
    update.update(gathered)

    # Rollouts with HF generate (vLLM engines hold their own memory), and evaluation.
    phases = {"update": update}
    if not svf:
        update.pop(next(k for k in update if "W'" in k))
    if config.engine == "hf":
        at_once = min(prompts, max(1, HF_BATCH_SEQUENCES // G)) * G  # HFEngine's generate() calls
        phases["rollout"] = _generation(shapes, b, at_once, P, C, config.weight_cache) | gathered
    evaluation_new = max(config.max_new_tokens, config.base_eval_max_new_tokens)
    evaluated = min(config.eval_batch_size, max(config.eval_size, config.test_size))
    phases["evaluation"] = (_generation(shapes, b, evaluated, P, evaluation_new, config.weight_cache) | gathered
                            if config.engine == "hf" else {})
    # apply_svf runs on the host before the model moves to its device: there, the base weights are all held
    # until each target is replaced, plus copies of the kept ones (which let a mapped checkpoint file go).
    largest = max(o * i for _, o, i in shapes.targets)
    svd = {"base weights being replaced": target_numel * b, "copies of the kept weights": (
        shapes.params - target_numel) * b // share, "one matrix's fp32 SVD": 16 * largest}
    if sharded:  # every process decomposes whole matrices; ZeRO-3 shards them afterwards
        svd["whole weights and factors, before ZeRO-3 shards them"] = (
            (shapes.params - target_numel) * b + factor_numel * b) * (share - 1) // share
        svd["copies of the kept weights"] = (shapes.params - target_numel) * b
    on_gpu = torch.device(device).type != "cpu"
    if not on_gpu and svf:
        phases["SVD"] = svd
    estimate = MemoryEstimate(resident, phases)
    if on_gpu and svf:
        host = (sum(svd.values()) + resident["base weights (not SVF)"] + resident["U, s, Vᵀ"]) / GiB
        estimate.notes.append(f"host memory for the SVD at start-up: {host:.1f} GiB")
    if config.engine == "vllm":
        if torch.device(device).type == "cuda" and torch.cuda.is_available():
            total = torch.cuda.get_device_properties(torch.device(device)).total_memory
            estimate.vllm = int(config.vllm_gpu_memory_utilization * total)
            estimate.notes.append(f"vLLM: {config.vllm_gpu_memory_utilization:.0%} of this GPU")
        else:
            kv = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
            estimate.vllm = int(shapes.params * b + kv * GiB)
            estimate.notes.append(f"vLLM on CPU: its weights and a {kv:g} GiB KV cache")
    return estimate


def _layer_index(name: str) -> int | None:
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def _forward_transient(shapes: Shapes, b: int, tokens: int) -> int:
    """A no-grad forward's largest moment: one layer's MLP intermediates and attention tensors."""
    return int(tokens * (3 * shapes.intermediate + 4 * shapes.hidden + 2 * shapes.kv_heads * shapes.head_dim) * b)


def _generation(shapes: Shapes, b: int, sequences: int, prompt: int, new: int, weight_cache: str) -> dict[str, int]:
    kv = sequences * (prompt + new) * shapes.layers * 2 * shapes.kv_heads * shapes.head_dim * b
    prefill = _forward_transient(shapes, b, sequences * prompt)
    if weight_cache == "none":  # factored no-grad forwards keep an fp32 Vᵀx
        prefill += sequences * prompt * min(shapes.hidden, shapes.intermediate) * 4
    return {"key/value cache": kv, "prefill and sampling": prefill + sequences * shapes.vocab * 4 * 4}


def memory_report(estimate: MemoryEstimate) -> str:
    """One line per part, as printed at start-up."""
    lines = [f"predicted peak memory: {estimate.peak / GiB:.2f} GiB (during {estimate.peak_phase})"
             + (f", plus vLLM's {estimate.vllm / GiB:.2f} GiB" if estimate.vllm else "")]
    svd = estimate.peak_phase == "SVD"
    parts = [(k, v) for k, v in estimate.resident.items() if not (svd and k.startswith("kept"))]
    parts += [(f"{estimate.peak_phase}: {name}", value) for name, value in estimate.phases[estimate.peak_phase].items()]
    width = max(len(name) for name, _ in parts) + 2
    lines += [f"  {name:<{width}}{value / GiB:8.2f} GiB" for name, value in parts]
    return "\n".join(lines + [f"  {note}" for note in estimate.notes])


def predict_run(config, model_config_path: str | None = None, prompt_tokens: int = 256, gpu_gib: float = 80.0,
                auto_dtype: str = "bfloat16", processes: int = 1, zero_stage: int | None = None) -> str:
    """`svf-rl memory`: the prediction for a configuration on a GPU of `gpu_gib`, from the model's config.json
    alone, and whether it fits with a colocated vLLM's share; per process with `processes` and `zero_stage`."""
    from transformers import AutoConfig

    from svf_rl.base_model import DTYPES, resolve_model_path

    source = model_config_path or resolve_model_path(config.model)
    try:
        model_config = AutoConfig.from_pretrained(source)
    except OSError as err:
        raise FileNotFoundError(f"cannot read the config of {source!r} ({str(err).splitlines()[0]}); "
                                f"give --model-config path/to/config.json") from None
    dtype = DTYPES[auto_dtype if config.dtype == "auto" else config.dtype]
    estimate = estimate_memory(config, model_config, dtype, "cpu", prompt_tokens, processes, zero_stage=zero_stage)
    if config.engine == "vllm":
        estimate.vllm = int(config.vllm_gpu_memory_utilization * gpu_gib * GiB)
        estimate.notes = [f"vLLM: {config.vllm_gpu_memory_utilization:.0%} of {gpu_gib:g} GiB"]
    total = (estimate.peak + estimate.vllm) / GiB
    verdict = "fits" if total <= gpu_gib else "does not fit"
    return (f"{memory_report(estimate)}\n{total:.1f} GiB in all: {verdict} in {gpu_gib:g} GiB "
            f"({str(dtype).removeprefix('torch.')}, prompts up to {prompt_tokens} tokens; CUDA context and "
            f"allocator slack not included)")

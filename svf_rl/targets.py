"""Which matrices a policy adapts: `targets` means the same for every policy (mlp, attn, all, or a regex over
module names), so that a comparison adapts the same matrices."""

from __future__ import annotations

import re

from torch import nn

TARGET_PRESETS = {
    "mlp": r"(^|\.)(mlp|feed_forward|ffn)\.",
    "attn": r"(^|\.)(self_attn|attn|attention|self_attention)\.",
    "all": r"(^|\.)(mlp|feed_forward|ffn|self_attn|attn|attention|self_attention)\.",
}

def target_pattern(targets: str) -> re.Pattern:
    try:
        return re.compile(TARGET_PRESETS.get(targets, targets))
    except re.error as err:
        raise ValueError(f"targets {targets!r} is neither a preset {sorted(TARGET_PRESETS)} "
                         f"nor a valid regex: {err}") from None


def find_targets(model: nn.Module, targets: str) -> list[str]:
    """Names of the nn.Linear modules selected by a preset (mlp, attn, all) or a regex over module names."""
    pattern = target_pattern(targets)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.search(n)]
    if not names:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:5]
        raise ValueError(f"targets {targets!r} matched no nn.Linear module; some linear modules: {linear}")
    tied = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if tied is not None and getattr(model.config, "tie_word_embeddings", False):
        tied_name = next((n for n, m in model.named_modules() if m is tied), None)
        if tied_name in names:
            raise ValueError(f"{tied_name} is tied to the input embeddings and cannot be an SVF target")
    return names

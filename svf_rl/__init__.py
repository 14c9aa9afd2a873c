"""svf-rl: train SVF expert vectors (Transformer²) with REINFORCE and a KL penalty."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """svf_rl.from_pretrained and svf_rl.SVFModel, imported when first used (torch loads only then)."""
    if name in ("from_pretrained", "SVFModel"):
        from svf_rl.inference import live

        return getattr(live, name)
    raise AttributeError(f"module 'svf_rl' has no attribute {name!r}")

"""svf-rl: train SVF expert vectors (Transformer²) with REINFORCE and a KL penalty."""

__version__ = "0.1.0"

"""Using what was trained: expert files, eval, compose, merge, Transformer²'s adaptation, Sakana import, export
of checkpoints, and PEFT adapter directories."""

"""Trainable sets: which tensors a method moves (full, TT adapters, LoRA, prefixes)."""

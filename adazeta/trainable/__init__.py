"""Trainable sets: which tensors a method moves (full, sparse, TT adapters, LoRA, prefixes), and the TT layers and adapters AdaZeta adds."""

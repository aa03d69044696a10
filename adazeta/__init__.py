"""adazeta: memory-efficient zeroth-order fine-tuning of language models (AdaZeta, MeZO, ...)."""

__version__ = "0.1.0"

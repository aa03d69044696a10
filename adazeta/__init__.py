"""adazeta: memory-efficient zeroth-order fine-tuning of language models (AdaZeta, MeZO, ...).

As a library (README, "Use it as a library"):

    from adazeta import ZOFineTuner, ZOTrainer

`ZOFineTuner` (adazeta/api.py) steps a method in your own loop; `ZOTrainer` (adazeta/hf_trainer.py)
is a transformers.Trainer whose training step is the ZO step. They are imported on first use, so
that `import adazeta.config` (what adazeta-train reads before anything heavy) stays light.
"""

__version__ = "0.1.0"

EXPORTS = {
    "ZOFineTuner": "adazeta.api",
    "StepResult": "adazeta.api",
    "method_names": "adazeta.api",
    "ZOTrainer": "adazeta.hf_trainer",
    "ZOOptimizer": "adazeta.hf_trainer",
}
__all__ = ["__version__", *EXPORTS]


def __getattr__(name: str):
    if name in EXPORTS:
        import importlib

        return getattr(importlib.import_module(EXPORTS[name]), name)
    raise AttributeError(f"module 'adazeta' has no attribute {name!r}")

"""moe_mtl: multi-task learning with task-level sparse Mixture-of-Experts BART."""

__version__ = "0.1.0"
__all__ = ["MoEBartConfig", "MoEBartForConditionalGeneration", "MoEOptions", "__version__"]


def __getattr__(name: str):
    # the model classes load on first use: importing transformers (and torch) here would make every
    # `import moe_mtl.<module>` pay for it, `moe-mtl --help` and `moe-mtl summarize` included
    if name in ("MoEBartConfig", "MoEBartForConditionalGeneration", "MoEOptions"):
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

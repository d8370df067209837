"""align: causal-LM fine-tuning, SFT and DPO as YAML recipes that share one runtime."""

from __future__ import annotations

import contextlib

__version__ = "0.1.0"

# What summary.json records (and the model card shows): the libraries a stage's result depends on.
RECORDED = ("torch", "transformers", "trl", "datasets", "tokenizers", "peft", "accelerate", "wandb")


def versions(names: tuple[str, ...] = RECORDED) -> dict[str, str]:
    """align's, Python's and the installed libraries' versions (a library that is not installed is left out)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"align": __version__, "python": platform.python_version()}
    for name in names:
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out

"""Where the Triton kernels learn whether they run under the interpreter, and how they autotune.

``TRITON_INTERPRET`` is read once at import (the env var -> module flag -> accessor pattern of
``timm.layers.config``). Under the interpreter every program runs sequentially in numpy, so autotuning
collapses to one fixed config; on CUDA the full config list is benchmarked once per ``key``.

``VISIONATTN_AUTOTUNE=0`` keeps only the first config of each list (the tuned default for Hopper) on CUDA: test
suites that launch many shapes then compile one kernel per shape instead of one per config.
"""

import os

import triton

__all__ = ["autotune", "autotune_configs", "autotune_kwargs", "is_interpreter"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_AUTOTUNE = os.environ.get("VISIONATTN_AUTOTUNE", "1") != "0"


def is_interpreter() -> bool:
    """True when Triton kernels execute under ``TRITON_INTERPRET=1`` (CPU, numpy)."""
    return _INTERPRET


def autotune_configs(full: list, default) -> list:
    """The configs ``triton.autotune`` should try: ``[default]`` under the interpreter, else ``full``
    (only its first entry with ``VISIONATTN_AUTOTUNE=0``)."""
    if _INTERPRET:
        return [default]
    return list(full) if _AUTOTUNE else [full[0]]


def autotune_kwargs() -> dict:
    """Extra keyword arguments for ``triton.autotune`` shared by every kernel (cache results on disk)."""
    return {"cache_results": True} if not _INTERPRET else {}


def autotune(full: list, default, key: list[str], prune):
    """``triton.autotune`` over :func:`autotune_configs` of ``full`` and ``default``, keyed by ``key``, with the
    early pruner ``prune`` and :func:`autotune_kwargs`."""
    return triton.autotune(
        configs=autotune_configs(full, default),
        key=key,
        prune_configs_by={"early_config_prune": prune},
        **autotune_kwargs(),
    )

"""What the processors know about the current forward: the latent token grid, the denoising step, the mask cache.

A forward pre-hook on the transformer/UNet (installed by ``apply``) reads the latent shape, ``patch_size`` and
``timestep`` of every call and writes them into one ``DiffusionState`` that all processors of that model share.
Nothing in diffusers is patched: the hook only reads the call's arguments.

The step index counts distinct timesteps: a call whose timestep is lower than the previous one starts the next step,
an equal timestep is the same step (classifier-free guidance run as separate cond/uncond passes, as Wan does), and a
higher timestep starts a new generation at step 0. Second-order samplers (Heun) evaluate two timesteps per scheduler
step, so there the index counts model evaluations at distinct timesteps.
"""

import inspect
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

__all__ = ["DiffusionState"]

#: ``grid_reader(model, bound_arguments) -> (T, Y, X) or (Y, X)``: the latent token grid after patchify.
_GridReader = Callable[[torch.nn.Module, dict], tuple[int, ...]]


@dataclass
class DiffusionState:
    """Per-model state shared by the processors that ``apply`` installed.

    Attributes:
        grid: latent token grid of the current call after patchify, ``(Y, X)`` or ``(T, Y, X)``.
        step: denoising step index of the current call (see the module docstring).
        timestep: timestep value of the current call (first batch element).
        dense_layers: layers ``layer_idx < dense_layers`` run dense softmax attention.
        dense_steps: steps ``step < dense_steps`` run dense softmax attention.
        cache: masks and other per-shape objects, keyed by what they depend on (shared by all layers).
    """

    grid: tuple[int, ...] | None = None
    step: int = 0
    timestep: float | None = None
    dense_layers: int = 0
    dense_steps: int = 0
    cache: dict = field(default_factory=dict)
    _density_sum: float = 0.0
    _density_count: int = 0

    def is_dense(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` runs dense attention in the current call (the schedule of Radial Attention)."""
        return layer_idx < self.dense_layers or self.step < self.dense_steps

    def cached(self, key: Hashable, build: Callable[[], object]):
        """``cache[key]``, built on first use (outside ``torch.compile`` graphs: masks are built eagerly, once)."""
        value = self.cache.get(key)
        return self._build(key, build) if value is None else value

    @torch.compiler.disable
    def _build(self, key: Hashable, build: Callable[[], object]):
        self.cache[key] = build()
        return self.cache[key]

    def record_density(self, density) -> None:
        """Add one attention call's density (fraction of query-key pairs computed exactly; float or 0-d tensor)."""
        self._density_sum = self._density_sum + density
        self._density_count += 1

    def mean_density(self) -> float | None:
        """Mean density over the calls since ``reset``; ``None`` when no call was recorded."""
        if not self._density_count:
            return None
        return float(self._density_sum) / self._density_count

    def reset(self) -> None:
        """Forget the step counter and density statistics (the next call is step 0); masks stay cached."""
        self.step, self.timestep = 0, None
        self._density_sum, self._density_count = 0.0, 0

    def latent_grid(self) -> tuple[int, ...]:
        """The latent token grid of the current call; raises when no hooked model call has set it."""
        if self.grid is None:
            raise RuntimeError(
                "the token grid is unknown: call the model (transformer/UNet) that apply() was given, not a submodule."
            )
        return self.grid

    def level_grid(self, num_tokens: int) -> tuple[int, ...]:
        """The grid of a UNet level holding ``num_tokens`` tokens.

        A UNet sees the latent grid at every level, downsampled by stride-2 convolutions (``ceil(size / 2)`` per
        level), so the grid is halved until it has ``num_tokens`` tokens.
        """
        grid = self.latent_grid()
        while math.prod(grid) > num_tokens and any(s > 1 for s in grid):
            grid = tuple(-(-s // 2) for s in grid)
        if math.prod(grid) != num_tokens:
            raise RuntimeError(
                f"the attention input has {num_tokens} grid tokens, which is no UNet level of the latent grid "
                f"{self.grid}."
            )
        return grid

    def _advance(self, timestep: float | None) -> None:
        if timestep is None or self.timestep is None or timestep > self.timestep:
            self.step = 0
        elif timestep < self.timestep:
            self.step += 1
        self.timestep = timestep


def _timestep_value(timestep) -> float | None:
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        return float(timestep.detach().flatten()[0]) if timestep.numel() else None
    return float(timestep)


class _GridStepHook:
    """Forward pre-hook (``with_kwargs=True``) that fills a ``DiffusionState`` from the call's arguments."""

    def __init__(self, model: torch.nn.Module, state: DiffusionState, read_grid: _GridReader):
        self.state = state
        self.read_grid = read_grid
        self.signature = inspect.signature(model.forward)

    @torch.compiler.disable
    def __call__(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        self.state.grid = tuple(int(s) for s in self.read_grid(model, bound))
        self.state._advance(_timestep_value(bound.get("timestep")))

"""What every per-model processor shares: the method strategy, the grid of the call, the dense fallback.

Shape legend: ``B`` batch, ``H`` heads, ``N`` tokens (text and grid), ``D`` head dim.

Design: one processor class per model (``<Model>MethodAttnProcessor`` in ``<model>.py``) parameterised by a method
strategy (``_methods.py``), instead of one class per (model, method) pair. The model-specific part — projections,
QK-norm, RoPE, text/image concatenation and split, output projections — is a statement-for-statement copy of the
stock diffusers processor and exists once per model; the method-specific part — the attention call — exists once
per method. N models × M methods thus cost N + M classes, and a fix to either side lands everywhere.
"""

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch import nn

from ..layout import TokenGrid
from ._hooks import DiffusionState, _GridReader

__all__ = []


@dataclass(frozen=True)
class _ModelSpec:
    """How ``apply`` handles one diffusers model class.

    Args:
        class_name: the diffusers model class, e.g. ``"WanTransformer3DModel"``.
        processor_cls: its ``<Model>MethodAttnProcessor``.
        self_attention: regex over ``named_modules()`` names selecting the self-attention modules over the latent
            grid (cross-attention and text-only attention, e.g. HunyuanVideo's token refiner, stay stock).
        read_grid: latent token grid of a forward call from the model and its bound arguments.
        is_video: the grid is ``(T, Y, X)``, else ``(Y, X)``.
        text_position: where the text tokens sit in the joint sequence: ``"before"``, ``"after"`` or ``None``.
        multi_level: the model sees the grid at several resolutions (UNet levels).
    """

    class_name: str
    processor_cls: type
    self_attention: re.Pattern
    read_grid: _GridReader
    is_video: bool
    text_position: str | None = None
    multi_level: bool = False


def _key_padding(attention_mask: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """``(B, N)`` bool keys-to-keep from a key-padding mask ``(B, 1, 1, N)`` or ``(B, N)`` (bool or 0/1)."""
    mask = attention_mask
    if mask.ndim == 4 and mask.shape[1] == mask.shape[2] == 1:
        mask = mask[:, 0, 0]
    if mask.ndim != 2 or mask.shape != (batch, length) or mask.dtype not in (torch.bool, torch.int64, torch.int32):
        raise NotImplementedError(
            "attention_mask must be a boolean key-padding mask (B, 1, 1, N) for the visionattn methods; "
            f"got attention_mask.shape={tuple(attention_mask.shape)}, dtype={attention_mask.dtype}."
        )
    return mask.bool()


class _MethodAttnProcessor(nn.Module):
    """Base of the per-model processors: holds the method and routes the attention call.

    Args:
        method: the attention strategy of this layer.
        state: the ``DiffusionState`` shared by all processors of the model.
        layer_idx: index of this self-attention layer in the model (for ``dense_layers``).
        spec: the model's ``_ModelSpec``.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, method: nn.Module, state: DiffusionState, layer_idx: int, spec: _ModelSpec):
        super().__init__()
        self.method = method
        self.state = state
        self.layer_idx = layer_idx
        self.spec = spec

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}"

    def _grid(self, num_tokens: int) -> TokenGrid:
        if self.spec.multi_level:
            return TokenGrid(self.state.level_grid(num_tokens))
        shape = self.state.latent_grid()
        text = num_tokens - math.prod(shape)
        if text < 0 or (text and self.spec.text_position is None):
            raise RuntimeError(
                f"the attention input has {num_tokens} tokens, which do not hold the latent grid {shape}"
                + (" plus text tokens." if self.spec.text_position else ".")
            )
        before = text if self.spec.text_position == "before" else 0
        return TokenGrid(shape, extra_before=before, extra_after=text - before)

    def _run(self, q, k, v, grid: TokenGrid):
        out, density = self.method(q, k, v, grid, self.state)
        if out is not None and density is not None:
            self.state.record_density(density)
        return out

    def _method_attention(self, q, k, v, attention_mask):
        """The method's output ``(B, H, N, D)``, or ``None`` where it keeps dense attention."""
        if self._parallel_config is not None:
            raise NotImplementedError(
                f"method={self.method.name!r} does not support diffusers' context parallelism yet; "
                "disable it (model.enable_parallelism) or use dense attention."
            )
        batch, _, length, _ = q.shape
        grid = self._grid(length)
        if attention_mask is None:
            return self._run(q, k, v, grid)
        keep = _key_padding(attention_mask, batch, length)
        if bool(keep.all()):
            return self._run(q, k, v, grid)
        # Padded text keys (HunyuanVideo pads the prompt at the end) are dropped per sample; padded text queries
        # still attend to all kept keys, as in the stock masked softmax.
        outs = []
        for b in range(batch):
            kept = int(keep[b].sum())
            dropped = length - kept
            if not bool(keep[b, :kept].all()) or dropped > grid.extra_after:
                raise NotImplementedError(
                    "attention_mask may only mask trailing text tokens for the visionattn methods."
                )
            sub = TokenGrid(grid.shape, extra_before=grid.extra_before, extra_after=grid.extra_after - dropped)
            qb, kb, vb = q[b : b + 1], k[b : b + 1, :, :kept], v[b : b + 1, :, :kept]
            out = self._run(qb[:, :, :kept], kb, vb, sub)
            if out is None:
                return None
            outs.append(torch.cat([out, F.scaled_dot_product_attention(qb[:, :, kept:], kb, vb)], dim=2))
        return torch.cat(outs, dim=0)

    def _attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        seq_dim: int = 2,
    ) -> torch.Tensor:
        """The attention call of the stock processor, with the method in place of dense softmax attention.

        Args:
            query: ``(B, H, N, D)`` (``seq_dim=2``, legacy processors) or ``(B, N, H, D)`` (``seq_dim=1``,
                dispatcher processors); keys and values alike.
            key: keys.
            value: values.
            attention_mask: the stock processor's mask (a key-padding mask for the methods).
            seq_dim: the token axis of the inputs and the output.
        """
        if seq_dim == 1:
            query, key, value = (t.transpose(1, 2) for t in (query, key, value))
        out = None
        if not self.state.is_dense(self.layer_idx):
            out = self._method_attention(query, key, value, attention_mask)
        if out is None:
            out = dispatch_attention_fn(
                query.transpose(1, 2),
                key.transpose(1, 2),
                value.transpose(1, 2),
                attn_mask=attention_mask,
                backend=self._attention_backend,
                parallel_config=self._parallel_config,
            ).transpose(1, 2)
            self.state.record_density(1.0)
        return out.transpose(1, 2) if seq_dim == 1 else out

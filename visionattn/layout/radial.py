"""Radial Attention's static video mask (mit-han-lab/radial-attention, ``gen_log_mask_shrinked``), exactly.

Shape legend: ``F`` latent frames, ``P`` tokens per frame (``p`` its raster index), ``N = F * P`` video tokens,
``S = N + extra_tokens`` sequence tokens, ``Bk`` the block size, ``M = ceil(S / Bk)`` blocks per side.
"""

import torch

from ..kernels._constants import DEFAULT_BLOCK_SIZE
from ._utils import _check_float, _check_int
from .block_mask import BlockMask

__all__ = ["radial_block_mask"]

#: The reference hard-codes 128 (the block size it was written for) in its diagonal-frequency rule
#: (``get_diagonal_split_mask``'s ``threshold``), whatever the block size.
_SPLIT_THRESHOLD = 128


def _decay_length(tokens_per_frame: int, distance: int) -> float:
    """``2**bitlen(P) / 2**bitlen(d)``: the band half-width before decay and block-size flooring."""
    return 2 ** tokens_per_frame.bit_length() / 2 ** distance.bit_length()


def _frame_pair_window(distance: int, tokens_per_frame: int, block_size: int, decay_factor: float) -> int | None:
    """Integer band half-width ``W`` of a frame pair at temporal distance ``d`` (``|p - p'| <= W``), or ``None``
    when the diagonal-frequency reduction drops the pair."""
    length = _decay_length(tokens_per_frame, distance)
    if length < _SPLIT_THRESHOLD and distance % int(_SPLIT_THRESHOLD / length) != 0:
        return None
    if distance <= 1:
        return tokens_per_frame
    width = length * decay_factor
    return min(tokens_per_frame, int(width if width >= block_size else block_size))


def _band_tiles(patterns: torch.Tensor, tokens_per_frame: int, block_size: int) -> torch.Tensor:
    """``shrinkMaskStrict`` of frame-pair bands, analytically: ``(K, c, c)`` bool for ``K`` patterns, ``c = ceil(P/Bk)``.

    ``patterns`` ``(K, 3)`` holds ``(W, r0, c0)``: the pair's ``P x P`` band ``|p - p'| <= W`` sits at ``(r0, c0)``
    inside a ``c*Bk`` square (the reference crops its padded buffer to ``c`` blocks). In tile ``(a, b)``, column ``x``
    holds the rows ``y`` of ``[a*Bk, a*Bk + Bk) ∩ [r0, r0 + P) ∩ [x - c0 + r0 - W, x - c0 + r0 + W]``; the tile is
    kept iff more than 60 % of its nonzero columns have density ``> 1/3``. The integer forms ``3 * count > Bk`` and
    ``5 * high > 3 * nonzero`` reproduce the reference's float32 comparisons exactly.
    """
    c = -(-tokens_per_frame // block_size)
    # int32 halves the memory traffic of int64; every coordinate is below 3 * c * Bk.
    window, row0, col0 = (patterns[:, i, None, None, None].int() for i in range(3))  # (K, 1, 1, 1) each
    tile_top = torch.arange(c, dtype=torch.int32)[None, :, None, None] * block_size  # (1, c, 1, 1): a * Bk
    x = torch.arange(c * block_size, dtype=torch.int32).view(1, 1, c, block_size)
    diag = x - col0 + row0
    lo = torch.maximum(torch.maximum(tile_top, row0), diag - window)
    hi = torch.minimum(torch.minimum(tile_top + block_size, row0 + tokens_per_frame), diag + window + 1)
    count = (hi - lo).clamp(min=0) * ((x >= col0) & (x < col0 + tokens_per_frame))
    high = (3 * count > block_size).sum(-1)
    nonzero = (count > 0).sum(-1)
    return 5 * high > 3 * nonzero


#: Patterns evaluated per batch in ``_band_tiles`` (bounds memory to ~100 MB at c = 30, Bk = 128).
_PATTERNS_PER_BATCH = 32


def radial_block_mask(
    num_frames: int,
    tokens_per_frame: int,
    block_size: int = DEFAULT_BLOCK_SIZE,
    decay_factor: float = 1.0,
    sink: bool = True,
    extra_tokens: int = 0,
) -> BlockMask:
    r"""Radial Attention's block mask: dense near frames, a band that halves with each doubling of frame distance.

    For query frame :math:`i`, key frame :math:`j`, :math:`d = |i - j|` and :math:`g = \mathrm{bitlen}(d)`
    (Li et al., "Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long Video Generation",
    arXiv 2506.19852; semantics of the reference code ``gen_log_mask_shrinked``):

    1. sink: with ``sink`` (Wan), every frame attends frame 0 fully (HunyuanVideo: ``sink=False``);
    2. diagonal frequency: with :math:`L = 2^{\mathrm{bitlen}(P)} / 2^g < 128`, the pair is kept only if
       :math:`d \bmod \lfloor 128 / L \rfloor = 0`;
    3. window: token :math:`p` of frame :math:`i` sees token :math:`p'` of frame :math:`j` iff :math:`|p - p'| \le w(d)`,
       :math:`w = P` for :math:`d \le 1`, else :math:`w = \max(L \cdot \delta, B_k)` (a band in raster order);
    4. block-ization: each pair's token mask, placed at its absolute offset, becomes ``Bk x Bk`` tiles; a tile is kept
       iff more than 60 % of its nonzero columns have density above 1/3; tiles are OR-ed over pairs;
    5. block rows and columns from ``N // Bk`` on (text tokens and the block holding the video/text border) are dense.

    Each frame pair is evaluated analytically (column counts of a band), once per distinct
    ``(w, row offset, column offset)``, so HunyuanVideo at 4x length (460,800 tokens) builds in seconds on one core.

    Args:
        num_frames: latent frames ``F``.
        tokens_per_frame: tokens per latent frame ``P``.
        block_size: block size ``Bk`` (the reference supports 64 and 128; any positive int works here).
        decay_factor: :math:`\delta`, band-width multiplier (repository scripts: Wan 0.2, HunyuanVideo 0.95).
        sink: attention sink on frame 0 (the reference's ``model_type="wan"``).
        extra_tokens: global tokens after the video (HunyuanVideo's text).

    Returns:
        ``BlockMask`` with batch/heads ``(1, 1)``, ``q_len == kv_len == F * P + extra_tokens``, no partial blocks.
        The reference allocates ``S // Bk`` blocks per side and would fail where a frame's tiles cross that edge; here
        the matrix has ``ceil(S / Bk)`` blocks and such tiles are clipped. Densities quoted for the reference are
        those of the leading ``(N // Bk)^2`` video blocks, the part its block-sparse attention call uses.

    Raises:
        ValueError: a size is not a positive int, or ``decay_factor`` is not positive.

    Example:
        >>> mask = radial_block_mask(num_frames=18, tokens_per_frame=3840, decay_factor=0.2)
        >>> mask.num_q_blocks, round(mask.density(), 3)
        (540, 0.287)
    """
    num_frames = _check_int("num_frames", num_frames)
    tokens_per_frame = _check_int("tokens_per_frame", tokens_per_frame)
    block_size = _check_int("block_size", block_size)
    extra_tokens = _check_int("extra_tokens", extra_tokens, minimum=0)
    decay_factor = _check_float("decay_factor", decay_factor, positive=True)
    if not isinstance(sink, bool):
        raise TypeError(f"sink must be a bool; got sink={sink!r}.")
    video = num_frames * tokens_per_frame
    seq = video + extra_tokens
    blocks = -(-seq // block_size)
    windows = [_frame_pair_window(d, tokens_per_frame, block_size, decay_factor) for d in range(num_frames)]
    # Group frame pairs by their band pattern (W, row offset, column offset): few distinct ones, each computed once.
    placements: dict[tuple[int, int, int], list[tuple[int, int]]] = {}
    for i in range(num_frames):
        row_start, row_offset = divmod(i * tokens_per_frame, block_size)
        for j in range(num_frames):
            window = tokens_per_frame if sink and j == 0 else windows[abs(i - j)]
            if window is not None:
                col_start, col_offset = divmod(j * tokens_per_frame, block_size)
                placements.setdefault((window, row_offset, col_offset), []).append((row_start, col_start))
    keep = torch.zeros(blocks, blocks, dtype=torch.bool)
    keys = list(placements)
    for lo in range(0, len(keys), _PATTERNS_PER_BATCH):
        batch = keys[lo : lo + _PATTERNS_PER_BATCH]
        tiles = _band_tiles(torch.tensor(batch), tokens_per_frame, block_size)
        for key, pattern in zip(batch, tiles):
            tile_rows, tile_cols = pattern.nonzero(as_tuple=True)
            starts = torch.tensor(placements[key])
            rows = (starts[:, :1] + tile_rows[None]).flatten()
            cols = (starts[:, 1:] + tile_cols[None]).flatten()
            inside = (rows < blocks) & (cols < blocks)
            keep[rows[inside], cols[inside]] = True
    border = video // block_size
    keep[border:] = True
    keep[:, border:] = True
    return BlockMask.from_block_matrix(keep[None, None], q_len=seq, kv_len=seq, block_q=block_size, block_k=block_size)

"""Draw an attention pattern as a PNG: the block map, and the tokens one query attends on its 1D/2D/3D grid.

    python tools/viz.py neighborhood --grid 24 24 --kernel-size 7 --tile 4 4 --query 2 20 --out na.png
    python tools/viz.py neighborhood --grid 4 16 16 --kernel-size 3 7 7 --stride 1 4 4 --query 2 8 8 --out na3d.png
    python tools/viz.py circle --grid 32 32 --radius 8 --extra-before 16 --query 16 16 --out circle.png
    python tools/viz.py radial --grid 8 16 16 --block-size 64 --decay-factor 1.0 --query 5 8 8 --out radial.png
    python tools/viz.py routing --grid 28 28 --regions 7 7 --topk 4 --query 10 10 --out routing.png
    python tools/viz.py sla --grid 32 32 --block-size 64 --ratio 0.1 --query 10 10 --out sla.png

Left panel: kept key blocks per query block (dark: fully allowed, light: partial, i.e. token-masked). Right panel:
the chosen query (red) and every key it attends (dark) on the grid; 3D grids are drawn frame by frame side by side.
Routing and SLA masks depend on q and k: the tool uses smooth position-dependent random features (seeded), so the
picture shows the pattern's shape, not a trained model's choices.
"""

import argparse
import math
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from visionattn.layout import (  # noqa: E402
    BlockMask,
    TokenGrid,
    TokenLayout,
    circular_window_block_mask,
    neighborhood_block_mask,
    radial_block_mask,
    topk_ratio_block_mask,
    topk_routing_block_mask,
)

PATTERNS = ("neighborhood", "circle", "radial", "routing", "sla")


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pattern", choices=PATTERNS)
    parser.add_argument("--grid", type=int, nargs="+", required=True, help="grid size: X | Y X | T Y X")
    parser.add_argument("--query", type=int, nargs="+", default=None, help="query coordinate (default: grid centre)")
    parser.add_argument("--tile", type=int, nargs="+", default=None, help="tile shape for tile order (default: raster)")
    parser.add_argument("--extra-before", type=int, default=0, help="global tokens before the grid")
    parser.add_argument("--kernel-size", type=int, nargs="+", default=[7])
    parser.add_argument("--stride", type=int, nargs="+", default=[1])
    parser.add_argument("--dilation", type=int, nargs="+", default=[1])
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--radius", type=float, default=8.0)
    parser.add_argument("--block-size", type=int, default=None, help="raster-order block size (radial, sla)")
    parser.add_argument("--decay-factor", type=float, default=1.0)
    parser.add_argument("--no-sink", action="store_true", help="radial: no attention sink (HunyuanVideo)")
    parser.add_argument("--regions", type=int, nargs="+", default=[7, 7], help="routing: regions per axis")
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.1, help="sla: kept fraction of key blocks")
    parser.add_argument("--out", required=True, help="output PNG path")
    args = parser.parse_args(argv)
    nd = len(args.grid)
    if not 1 <= nd <= 3:
        parser.error(f"--grid must have 1 to 3 sizes; got {args.grid}.")
    args.query = args.query or [s // 2 for s in args.grid]
    if len(args.query) != nd or any(not 0 <= q < s for q, s in zip(args.query, args.grid)):
        parser.error(f"--query must be {nd} coordinates inside the grid {args.grid}; got {args.query}.")
    per_axis = lambda v: v * nd if len(v) == 1 else v
    args.kernel_size, args.stride, args.dilation = (per_axis(v) for v in (args.kernel_size, args.stride, args.dilation))
    if args.pattern == "radial" and nd != 3:
        parser.error("radial needs a 3D --grid T Y X (frames, rows, columns).")
    if args.pattern == "routing" and len(args.regions) != nd:
        parser.error(f"--regions must have {nd} entries; got {args.regions}.")
    return args


def _features(grid: TokenGrid, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded smooth q/k features (1, N, dim): random Fourier features of the grid coordinates plus noise."""
    gen = torch.Generator().manual_seed(0)
    coords = grid.coords().float() / torch.tensor(grid.shape).float()
    freqs = torch.randn(grid.ndim, dim // 2, generator=gen) * 3
    base = torch.cat([torch.sin(coords @ freqs), torch.cos(coords @ freqs)], -1)
    q = base + 0.3 * torch.randn(base.shape, generator=gen)
    k = base + 0.3 * torch.randn(base.shape, generator=gen)
    extra = torch.randn(grid.extra_before, dim, generator=gen)
    return torch.cat([extra, q])[None], torch.cat([extra, k])[None]


def build(args) -> tuple[BlockMask, TokenLayout]:
    """The pattern's mask and the layout its positions refer to."""
    grid = TokenGrid(tuple(args.grid), extra_before=args.extra_before)
    tile = tuple(args.tile) if args.tile else None
    if args.pattern == "neighborhood":
        layout = TokenLayout(grid, tile=tile)
        mask = neighborhood_block_mask(
            layout,
            args.kernel_size,
            args.stride,
            args.dilation,
            args.causal,
            block_size=None if tile else args.block_size,
        )
    elif args.pattern == "circle":
        layout = TokenLayout(grid, tile=tile)
        mask = circular_window_block_mask(layout, args.radius, block_size=None if tile else args.block_size)
    elif args.pattern == "radial":
        frames, rows, cols = args.grid
        layout = TokenLayout(TokenGrid(tuple(args.grid), extra_after=args.extra_before))
        mask = radial_block_mask(
            frames,
            rows * cols,
            block_size=args.block_size or 64,
            decay_factor=args.decay_factor,
            sink=not args.no_sink,
            extra_tokens=args.extra_before,
        )
    elif args.pattern == "routing":
        region = tuple(math.ceil(s / r) for s, r in zip(args.grid, args.regions))
        layout = TokenLayout(TokenGrid(tuple(args.grid)), tile=region)
        q, k = (layout.to_layout(t, dim=1) for t in _features(TokenGrid(tuple(args.grid))))
        mask = topk_routing_block_mask(q, k, layout, args.topk)
    else:
        layout = TokenLayout(grid)
        q, k = _features(grid)
        block = args.block_size or 64
        mask = topk_ratio_block_mask(q[:, None], k[:, None], block, block, args.ratio)
    return mask, layout


def attended_row(mask: BlockMask, position: int) -> torch.Tensor:
    """Bool ``(kv_len,)``: the keys layout position ``position`` attends (batch 0, head 0)."""
    m = position // mask.block_q
    start, end = int(mask.indptr[0, 0, m]), int(mask.indptr[0, 0, m + 1])
    row = torch.zeros(mask.kv_len, dtype=torch.bool)
    kv = torch.arange(mask.kv_len)
    for col, partial in zip(mask.indices[start:end].tolist(), mask.partial[start:end].tolist()):
        lo, hi = col * mask.block_k, min((col + 1) * mask.block_k, mask.kv_len)
        allowed = torch.ones(hi - lo, dtype=torch.bool)
        if partial:
            allowed = mask.token_mask(torch.tensor(position), kv[lo:hi])
        row[lo:hi] = allowed
    return row


def render(mask: BlockMask, layout: TokenLayout, query: list[int], title: str, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keep, partial = mask.to_block_matrix()
    block_map = keep[0, 0].float() * 2 - partial[0, 0].float()
    grid = layout.grid
    strides = [math.prod(grid.shape[i + 1 :]) for i in range(grid.ndim)]
    raster = grid.extra_before + sum(q * s for q, s in zip(query, strides))
    position = int((layout.source_index() == raster).nonzero()[0])
    row = attended_row(mask, position)
    kind, coords, valid = layout.token_coords(torch.arange(layout.num_tokens))
    image = torch.zeros(grid.shape)
    on_grid = (kind == 1) & valid & row
    image[tuple(coords[on_grid].T)] = 1.0
    image[tuple(query)] = 2.0
    frames = image.reshape(-1, *grid.shape[-2:]) if grid.ndim == 3 else image.reshape(1, -1, grid.shape[-1])
    fig, axes = plt.subplots(1, 1 + len(frames), figsize=(4 + 2.2 * len(frames), 4), squeeze=False)
    axes[0, 0].imshow(block_map, cmap="Greys", vmin=0, vmax=2, interpolation="nearest")
    axes[0, 0].set_title(f"block map {tuple(keep.shape[2:])}\ndensity {mask.density():.3f}", fontsize=8)
    axes[0, 0].set_xlabel("key block")
    axes[0, 0].set_ylabel("query block")
    cmap = matplotlib.colors.ListedColormap(["white", "black", "red"])
    for i, frame in enumerate(frames):
        ax = axes[0, 1 + i]
        ax.imshow(frame, cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
        ax.set_title(f"frame {i}" if grid.ndim == 3 else f"query {tuple(query)}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    extra = int((row & (kind != 1)).sum())
    fig.suptitle(f"{title}  (query attends {int(row.sum())} tokens, {extra} global)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = _parse_args(argv)
    mask, layout = build(args)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    render(mask, layout, args.query, f"{args.pattern} {tuple(args.grid)}", out)
    print(f"{mask}\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

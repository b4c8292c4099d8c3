"""Time the block-sparse forward kernel under each autotune config on its own (CUDA only).

The autotuner keeps only its winner; this prints every config's time on the masks where the choice mattered on the
H100 (docs/benchmarks/README.md, "block-sparse forward per autotune config"): FLUX-2048 dense, HunyuanVideo with
GNA stride (no partial blocks) and Wan 2.1's 3D window (mostly partial blocks). Each config runs alone, timed from a
CUDA graph (``triton.testing.do_bench_cudagraph``), bf16, D = 128; ``--extra`` adds configs outside the autotune list.
A config that does not fit the head dim's shared memory prints ``FAIL OutOfResources`` (autotuning skips it).

Usage::

    python tools/sweep_configs.py                 # the three masks, the autotune configs
    python tools/sweep_configs.py --extra 128,128,8,3 64,128,4,3
"""

import argparse
import functools

import torch


def _masks(device):
    """``[(label, batch, heads, head dim, BlockMask)]``, built on ``device``."""
    from visionattn.layout import BlockMask, TokenGrid, TokenLayout, neighborhood_block_mask
    from visionattn.ops import default_neighborhood_tile

    def layout(shape):
        return TokenLayout(TokenGrid(shape), tile=default_neighborhood_tile(shape))

    blocks = -(-16896 // 128)
    dense = BlockMask.from_block_matrix(
        torch.ones(1, 1, blocks, blocks, dtype=torch.bool), q_len=16896, kv_len=16896, block_q=128, block_k=128
    )
    hunyuan = neighborhood_block_mask(layout((30, 48, 80)), (18, 24, 24), (16, 8, 8))
    wan = neighborhood_block_mask(layout((21, 30, 52)), (11, 16, 24), (1, 8, 8))
    return [
        ("FLUX-2048 dense B1 H24", 1, 24, 128, dense.to(device)),
        ("HunyuanVideo (18,24,24) s(16,8,8) B1 H24", 1, 24, 128, hunyuan.to(device)),
        ("Wan 2.1 (11,16,24) s(1,8,8) B1 H12", 1, 12, 128, wan.to(device)),
    ]


def _config(text: str):
    import triton

    tile_m, tile_n, warps, stages = (int(x) for x in text.split(","))
    return triton.Config({"TILE_M": tile_m, "TILE_N": tile_n}, num_warps=warps, num_stages=stages)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--extra", nargs="*", default=[], help="extra configs TILE_M,TILE_N,warps,stages")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tools/sweep_configs.py times CUDA kernels; no CUDA device is available.")
    from triton.testing import do_bench_cudagraph

    from visionattn.kernels import block_sparse
    from visionattn.ops import block_sparse_attention

    kernel = block_sparse._block_sparse_fwd_kernel
    configs = list(kernel.configs) + [_config(text) for text in args.extra]
    for label, batch, heads, dim, mask in _masks("cuda"):
        q, k, v = (torch.randn(batch, heads, mask.q_len, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        kept_flops = 4 * batch * heads * mask.q_len * mask.kv_len * dim * mask.density()
        partial = float(mask.partial.float().mean())
        print(f"## {label}: block density {mask.density():.3f}, partial fraction of kept blocks {partial:.3f}")
        for config in configs:
            kernel.configs = [config]
            kernel.cache.clear()
            name = f"{config.kwargs['TILE_M']}x{config.kwargs['TILE_N']} w{config.num_warps} s{config.num_stages}"
            try:
                ms = do_bench_cudagraph(functools.partial(block_sparse_attention, q, k, v, mask), rep=200)
            except Exception as error:  # noqa: BLE001 (a config that does not fit is reported, the sweep goes on)
                print(f"  {name}: FAIL {type(error).__name__}")
                continue
            print(f"  {name}: {ms:.3f} ms, {kept_flops / ms / 1e9:.0f} TFLOP/s over kept blocks")


if __name__ == "__main__":
    main()

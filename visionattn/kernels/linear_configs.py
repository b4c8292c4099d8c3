"""Autotune configs of the non-causal linear-attention kernels (``linear.py``, ``linear_bwd.py``) and their pruning.

Config families are picked by the state's size; figures are offline sm_90 compiles (``triton.compile`` for
``GPUTarget("cuda", 90, 64)`` with the runtime's stride-1 and 16-byte specialisations, registers and SASS from
``cuobjdump``), not GPU timings.
"""

import triton

__all__ = []

#: (BLOCK_N, num_warps, num_stages): three deep-pipelined configs for states up to 64x128, mostly shallow ones for
#: 128x128 states. Offline sm90 compiles (``triton.compile`` + ptxas -v) showed that 3-stage pipelines of 128-wide
#: fp32 tiles need more than the 227 KB of shared memory and that 4 warps spill at 128 rows; 16-bit 64-row tiles
#: fit three stages (state pass at D = Dv = 128, Triton 3.6: 192-250 regs, 74-90 KB, no spills).
_SMALL_STATE_CONFIGS = ((64, 4, 3), (64, 8, 3), (128, 8, 3))
_BIG_STATE_CONFIGS = ((32, 4, 2), (32, 8, 2), (64, 8, 2), (64, 8, 3))
#: Big-state configs first: ``VISIONATTN_AUTOTUNE=0`` keeps only the first config, and Triton's autotuner runs no
#: early pruning for a single config, so the first must fit every state size (offline sm_90, Triton 3.6, backward
#: apply at D = 128 with RALA + RoPE: (32, 4, 2) 131 KB of shared memory, (64, 4, 3) 245 KB > 227 KB).
_REDUCE_CONFIGS = [
    triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n, w, s in _BIG_STATE_CONFIGS + _SMALL_STATE_CONFIGS
]
#: The forward state pass on a 128 x 128 state also tries (BLOCK_N, num_warps, num_stages, DV_SPLIT): the whole
#: accumulator over 16 warps, or Dv split into two 128 x 64 tiles (``DV_SPLIT = 2``, see ``STATE_TILE_ELEMS``). The
#: big-state configs above hold 64 KB of fp32 accumulator in 8 warps: 190-250 regs at 64 rows, one program per SM.
#: Offline sm_90, Triton 3.6: (64, 16, 2/3) 118-128 regs (MALA: 8 B of stack), (32, 16, 3) 90-122; split (32, 8, 3/4)
#: 100-126 (RALA + RoPE 158-175) so two programs per SM, (64, 8, 3) 173-218.
_WIDE_STATE_CONFIGS = ((64, 16, 3, 1), (64, 16, 2, 1), (32, 16, 3, 1), (32, 8, 3, 2), (32, 8, 4, 2), (64, 8, 3, 2))
_STATE_CONFIGS = [
    triton.Config({"BLOCK_N": n, "DV_SPLIT": split}, num_warps=w, num_stages=s)
    for n, w, s, split in dict.fromkeys(
        tuple((*c, 1) for c in _SMALL_STATE_CONFIGS + _BIG_STATE_CONFIGS) + _WIDE_STATE_CONFIGS
    )
]
_STATE_DEFAULT = triton.Config({"BLOCK_N": 16, "DV_SPLIT": 1}, num_warps=4, num_stages=1)
#: The apply kernel's extra configs for 16-bit 128 x 128 states, (BLOCK_N, num_warps, num_stages, maxnreg): (64, 8, 3)
#: takes 132 regs (one 8-warp program per SM), capped at 128 it takes 127 without spills (plain; MALA + RoPE spills
#: 48 B), so two fit; (32, 8, 4) takes 80-102 regs and 64-88 KB (two to three per SM).
_APPLY_EXTRA_CONFIGS = ((64, 8, 3, 128), (32, 8, 4, None))
_APPLY_CONFIGS = _REDUCE_CONFIGS + [
    triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s, maxnreg=r) for n, w, s, r in _APPLY_EXTRA_CONFIGS
]
_REDUCE_DEFAULT = triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)
_BLOCK_CONFIGS = [triton.Config({"BLOCK_M": m}, num_warps=w) for m in (64, 128) for w in (4, 8)]
_BLOCK_DEFAULT = triton.Config({"BLOCK_M": 16}, num_warps=4, num_stages=1)


def _key(c: triton.Config) -> tuple:
    return c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, c.maxnreg


def _state_family(configs, state_bytes: int, extra=()):
    """The configs of the state size's family (see ``_SMALL_STATE_CONFIGS``) and ``extra``: autotuning compiles
    every config."""
    family = _BIG_STATE_CONFIGS if state_bytes > 64 * 128 * 4 else _SMALL_STATE_CONFIGS
    keys = {(*c, None) for c in family} | set(extra)
    return [c for c in configs if _key(c) in keys]


def _prune_reduce_configs(configs, nargs, **kwargs):
    """The family of an fp32 state (the split-N reductions accumulate it in fp32)."""
    args = {**nargs, **kwargs}
    return _state_family(configs, args["BLOCK_D"] * args["BLOCK_DV"] * 4)


def _prune_state_configs(configs, nargs, **kwargs):
    """The forward state pass: its family, plus ``_WIDE_STATE_CONFIGS`` up to ``MAX_DV_SPLIT`` tiles for big states
    (none with ``MAX_DV_SPLIT`` 0)."""
    args = {**nargs, **kwargs}
    big = args["BLOCK_D"] * args["BLOCK_DV"] > 64 * 128
    keys = {(*c, 1) for c in (_BIG_STATE_CONFIGS if big else _SMALL_STATE_CONFIGS)}
    if big:
        keys |= {c for c in _WIDE_STATE_CONFIGS if c[3] <= args["MAX_DV_SPLIT"]}
    split = lambda c: (c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, c.kwargs["DV_SPLIT"])
    return [c for c in configs if split(c) in keys]


def _prune_apply_configs(configs, nargs, **kwargs):
    """The family of the apply kernel's state operand, in the input dtype (16-bit 128 x 128: the deep pipelines and
    ``_APPLY_EXTRA_CONFIGS``)."""
    args = {**nargs, **kwargs}
    elems = args["BLOCK_D"] * args["BLOCK_DV"]
    extra = _APPLY_EXTRA_CONFIGS if elems >= 128 * 128 and args["q_ptr"].element_size() == 2 else ()
    return _state_family(configs, elems * args["q_ptr"].element_size(), extra)

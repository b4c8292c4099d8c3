"""Named numeric constants shared by the Triton kernels (each with its derivation)."""

import math

__all__ = ["DEFAULT_BLOCK_SIZE", "LN2", "LOG2E", "NEG_INF", "NORMALIZER_EPS"]

#: log2(e): softmax is evaluated as exp2(x * LOG2E) because exp2 is the native SFU instruction.
LOG2E = 1.0 / math.log(2.0)
#: ln(2): converts a base-2 log-sum-exp back to natural log, lse = lse2 * LN2.
LN2 = math.log(2.0)
#: Finite stand-in for -inf in running maxima, so fully masked rows give exp2(NEG_INF - m) = 0, never NaN.
NEG_INF = -1.0e30
#: Default token block (tile) size of the attention kernels: one 2D tile of 8x8 or 3D tile of 2x8x8 is 128 tokens.
DEFAULT_BLOCK_SIZE = 128
#: Guard added to linear-attention normalisers phi(q) z, the value used by MALA/RALA/LinFusion references.
NORMALIZER_EPS = 1e-6

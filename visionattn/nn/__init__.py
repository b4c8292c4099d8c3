"""Attention modules built from visionattn.ops, shared by the backbones and the diffusion processors."""

from .agent_attention import AgentAttention
from .gated_attention2d import GatedLinearAttention2d
from .layer_norm import LayerNorm, LayerNorm2d
from .linear_attention2d import LinearAttention2d
from .rms_norm import RmsNorm
from .rope2d import RoPE2d, apply_rope2d, rope2d_tables
from .routing_attention import BiLevelRoutingAttention, LePEAttention
from .softmax_attention2d import SoftmaxAttention2d
from .sparse_linear_attention import SparseLinearAttention
from .swiglu import GluMlp

__all__ = [
    "AgentAttention",
    "BiLevelRoutingAttention",
    "GatedLinearAttention2d",
    "GluMlp",
    "LayerNorm",
    "LayerNorm2d",
    "LePEAttention",
    "LinearAttention2d",
    "RmsNorm",
    "RoPE2d",
    "SoftmaxAttention2d",
    "SparseLinearAttention",
    "apply_rope2d",
    "rope2d_tables",
]

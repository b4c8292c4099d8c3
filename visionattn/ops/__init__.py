"""visionattn."""

from .agent import agent_attention, agent_attention_reference
from .block_sparse import block_sparse_attention, block_sparse_attention_reference
from .gated import gated_linear_attention, gated_linear_attention_reference
from .gated_norm import (
    gated_norm,
    gated_norm_reference,
    layer_norm,
    layer_norm_reference,
    rms_norm,
    rms_norm_reference,
)
from .gather import gather_tokens, gather_tokens_reference, inverse_token_index
from .linear import (
    LinearAttentionState,
    linear_attention,
    linear_attention_apply,
    linear_attention_query_mean,
    linear_attention_reference,
    linear_attention_state,
    merge_linear_attention_states,
)
from .neighborhood import default_neighborhood_tile, neighborhood_attention, neighborhood_attention_reference
from .routed import routed_attention, routed_attention_reference
from .sparse_linear import sparse_linear_attention, sparse_linear_attention_reference
from .swiglu import swiglu, swiglu_reference

__all__ = [
    "agent_attention",
    "agent_attention_reference",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "default_neighborhood_tile",
    "gated_linear_attention",
    "gated_linear_attention_reference",
    "gated_norm",
    "gated_norm_reference",
    "gather_tokens",
    "gather_tokens_reference",
    "inverse_token_index",
    "layer_norm",
    "layer_norm_reference",
    "LinearAttentionState",
    "linear_attention",
    "linear_attention_apply",
    "linear_attention_query_mean",
    "linear_attention_reference",
    "linear_attention_state",
    "merge_linear_attention_states",
    "neighborhood_attention",
    "neighborhood_attention_reference",
    "rms_norm",
    "rms_norm_reference",
    "routed_attention",
    "routed_attention_reference",
    "sparse_linear_attention",
    "sparse_linear_attention_reference",
    "swiglu",
    "swiglu_reference",
]

"""Pieces shared by the Agent Attention backbones (``agent_deit``, ``agent_pvt``, ``agent_swin``).

Paper: Han, Ye, Han, Xia, Pan, Wan, Song, Huang, "Agent Attention: On the Integration of Softmax and Linear
Attention", ECCV 2024, arXiv 2312.08874::

    @inproceedings{han2024agent,
      title={Agent Attention: On the Integration of Softmax and Linear Attention},
      author={Han, Dongchen and Ye, Tianzhu and Han, Yizeng and Xia, Zhuofan and Pan, Siyuan and Wan, Pengfei
              and Song, Shiji and Huang, Gao},
      booktitle={European Conference on Computer Vision}, year={2024}}

Reference code: github.com/LeapLabTHU/Agent-Attention (MIT licence), ``agent_transformer/models/``. Official
ImageNet-1k weights are on Tsinghua Cloud (links in that repository's ``agent_transformer/README.md``), not on the
Hugging Face hub: load them with ``pretrained=True, pretrained_cfg_overlay=dict(file=<downloaded .pth>)``.
"""

import torch
from timm.layers import DropPath, Mlp, register_notrace_module
from torch import nn

from ..layout import TokenGrid
from ..nn import AgentAttention, LayerNorm
from ._timm_api import imagenet_cfg

__all__ = ["AgentBlock"]


@register_notrace_module  # the grid is Python data: FX keeps the block as one leaf
class AgentBlock(nn.Module):
    """Pre-norm transformer block with agent attention as the token mixer (the reference's ``AgentBlock``).

    ``x = x + DropPath(AgentAttention(LN(x), grid))``, then ``x = x + DropPath(MLP(LN(x)))``; ``x`` is
    ``(B, N, C)`` with ``N = grid.num_tokens``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        agent_num: int,
        bias_size: tuple[int, int],
        agent_shape: tuple[int, int] | None = None,
        num_prefix_tokens: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] = LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        device=None,
        dtype=None,
    ):
        """
        Args:
            dim: channels.
            num_heads: attention heads.
            agent_num: agents the agent biases are stored for.
            bias_size: feature size the row/column agent biases are stored for.
            agent_shape: agents per axis at run time (None: ``sqrt(agent_num)`` each).
            num_prefix_tokens: cls tokens before the grid (0 or 1).
            mlp_ratio: MLP hidden width over ``dim``.
            qkv_bias: bias in the qkv projection.
            proj_drop: dropout after the attention and MLP projections.
            drop_path: stochastic depth rate.
            norm_layer: normalisation layer.
            act_layer: MLP activation.
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = norm_layer(dim, **dd)
        self.attn = AgentAttention(
            dim,
            num_heads=num_heads,
            agent_num=agent_num,
            bias_size=bias_size,
            agent_shape=agent_shape,
            num_prefix_tokens=num_prefix_tokens,
            qkv_bias=qkv_bias,
            proj_drop=proj_drop,
            **dd,
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), grid))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


# singleton axes of the reference's row/column/cls agent biases, dropped in ``AgentAttention``
_OFFICIAL_BIAS_SINGLETONS = {
    "ah_bias": (0, 4),  # (1, heads, n, H, 1)
    "aw_bias": (0, 3),  # (1, heads, n, 1, W)
    "ha_bias": (0, 3),  # (1, heads, H, 1, n)
    "wa_bias": (0, 2),  # (1, heads, 1, W, n)
    "ac_bias": (0,),  # (1, heads, n, 1)
    "ca_bias": (0,),  # (1, heads, 1, n)
}
_OFFICIAL_BIAS_NDIM = {"ah_bias": 5, "aw_bias": 5, "ha_bias": 5, "wa_bias": 5, "ac_bias": 4, "ca_bias": 4}


def _agent_bias_to_native(key: str, value: torch.Tensor) -> torch.Tensor:
    """Drop the singleton axes of an official agent bias (native tensors pass unchanged)."""
    name = key.rsplit(".", 1)[-1]
    if value.ndim == _OFFICIAL_BIAS_NDIM.get(name):
        return value.squeeze(_OFFICIAL_BIAS_SINGLETONS[name])
    return value


def _unwrap_state_dict(state_dict: dict) -> dict:
    """The official checkpoints keep the weights under ``"model"`` (Swin/DeiT training code)."""
    for key in ("model", "state_dict"):
        if key in state_dict and isinstance(state_dict[key], dict):
            return state_dict[key]
    return state_dict


def _agent_cfg(url: str = "", **kwargs) -> dict:
    """Pretrained cfg of the Agent Attention models (the reference evaluates at 224, resize 256 + center crop)."""
    defaults = imagenet_cfg(
        url=url,
        pool_size=(7, 7),
        first_conv="patch_embed.proj",
        classifier="head",
        license="mit",
        paper_ids="arXiv:2312.08874",
        paper_name="Agent Attention: On the Integration of Softmax and Linear Attention",
        origin_url="https://github.com/LeapLabTHU/Agent-Attention",
    )
    return {**defaults, **kwargs}  # a family overrides pool_size, first_conv or classifier

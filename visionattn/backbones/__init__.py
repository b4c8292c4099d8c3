"""timm-registered backbone families; importing this package registers every model name with timm."""

from .agent_deit import AgentVisionTransformer
from .agent_pvt import AgentPvt
from .agent_swin import AgentSwinTransformer
from .biformer import BiFormer
from .mavit import MAViT
from .ravlt import RAVLT
from .vig import ViG
from .vig_h import HierViG

__all__ = [
    "AgentPvt",
    "AgentSwinTransformer",
    "AgentVisionTransformer",
    "BiFormer",
    "HierViG",
    "MAViT",
    "RAVLT",
    "ViG",
]

"""timm-registered backbone families; importing this package registers every model name with timm."""

from .mavit import MAViT
from .ravlt import RAVLT
from .vig import ViG
from .vig_h import HierViG

__all__ = [
    "HierViG",
    "MAViT",
    "RAVLT",
    "ViG",
]

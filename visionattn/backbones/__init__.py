"""timm-registered backbone families; importing this package registers every model name with timm."""

from .mavit import MAViT
from .ravlt import RAVLT

__all__ = [
    "MAViT",
    "RAVLT",
]

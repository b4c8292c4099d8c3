"""diffusers integration: processors for visionattn's attention methods, the grid/step hook, ``apply``/``remove``."""

from ._hooks import DiffusionState
from ._methods import AgentMethod, LinearMethod, LocalMethod, RadialMethod, SparseLinearMethod
from .apply import AttentionHandle, apply, remove
from .cogvideox import CogVideoXMethodAttnProcessor
from .flux import FluxMethodAttnProcessor
from .hunyuan_video import HunyuanVideoMethodAttnProcessor
from .ltx_video import LTXVideoMethodAttnProcessor
from .sd3 import SD3MethodAttnProcessor
from .unet import UNetMethodAttnProcessor
from .wan import WanMethodAttnProcessor

__all__ = [
    "AgentMethod",
    "AttentionHandle",
    "CogVideoXMethodAttnProcessor",
    "DiffusionState",
    "FluxMethodAttnProcessor",
    "HunyuanVideoMethodAttnProcessor",
    "LTXVideoMethodAttnProcessor",
    "LinearMethod",
    "LocalMethod",
    "RadialMethod",
    "SD3MethodAttnProcessor",
    "SparseLinearMethod",
    "UNetMethodAttnProcessor",
    "WanMethodAttnProcessor",
    "apply",
    "remove",
]

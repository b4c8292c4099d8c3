"""visionattn."""

# Registers every backbone with timm (``timm.create_model("mavit_tiny")`` after ``import visionattn``).
from . import backbones  # noqa: F401

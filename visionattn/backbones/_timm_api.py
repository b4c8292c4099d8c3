"""timm's model interface, written once for the visionattn backbones.

timm (1.0.x) expects every model to expose ``group_matcher``, ``set_grad_checkpointing``, ``get_classifier``,
``reset_classifier``, ``forward_intermediates``, ``prune_intermediate_layers``, ``forward_head`` and ``forward``.
The hierarchical families (BiFormer, Agent-PVT, Agent-Swin, ViG-H, MAViT/RAVLT) implement them the same way; the
pieces here are that one implementation:

- :class:`StagedBackbone`: stem -> ``nn.Sequential`` of stages -> optional final norm; ``forward_intermediates``
  returns stage outputs. A model says where it differs through class attributes and two small hooks.
- :class:`ClassifierHeadMixin` (``self.head`` is timm's ``ClassifierHead``; also plain ViG) and
  :class:`LinearHeadMixin` (average pooling, ``self.head_drop``, ``self.head`` an ``nn.Linear``): the classifier
  half of the API.
- :func:`stage_group_matcher`, :func:`check_output_fmt`, :func:`check_global_pool`, :func:`create_backbone`,
  :func:`init_linear` and :func:`imagenet_cfg`: the grouping, validation, builder, init and pretrained-cfg helpers
  (also used by plain ViG and Agent-DeiT).

``forward`` stays in each model: torch.fx auto-wraps the ``register_notrace_function`` helpers found in the globals
of the module that defines the traced ``forward`` (e.g. ``vig.add_pos_embed``), so a ``forward`` defined here would
trace into them.
"""

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import get_device_dtype
from timm.models import build_model_with_cfg
from timm.models._features import feature_take_indices
from torch import nn

__all__ = [
    "ClassifierHeadMixin",
    "LinearHeadMixin",
    "StagedBackbone",
    "check_global_pool",
    "check_output_fmt",
    "create_backbone",
    "imagenet_cfg",
    "init_linear",
    "stage_group_matcher",
]


def check_output_fmt(output_fmt: str, allowed: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``output_fmt`` (of ``forward_intermediates``) is one of ``allowed``."""
    if output_fmt not in allowed:
        names = " or ".join(repr(fmt) for fmt in allowed)
        raise ValueError(f"output_fmt must be {names}; got output_fmt={output_fmt!r}.")


def check_global_pool(global_pool: str) -> None:
    """Raise ``ValueError`` unless ``global_pool`` is ``"avg"`` or ``""`` (the pooling of :class:`LinearHeadMixin`)."""
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool must be 'avg' or ''; got global_pool={global_pool!r}.")


def stage_group_matcher(
    coarse: bool, stem: str, final: str, stages: str = "stages", blocks: str = "blocks"
) -> dict[str, object]:
    """timm's layer groups of a staged model: the stem, each stage's downsampling and blocks, then ``final``.

    Args:
        coarse: one group per stage instead of one per block.
        stem: regex of the stem's parameter names.
        final: regex of the parameters after the last stage (final norm or projection).
        stages: attribute name of the stage list.
        blocks: regex of the block list's name inside a stage.
    """
    return dict(
        stem=stem,
        blocks=rf"^{stages}\.(\d+)"
        if coarse
        else [
            (rf"^{stages}\.(\d+)\.downsample", (0,)),
            (rf"^{stages}\.(\d+)\.{blocks}\.(\d+)", None),
            (final, (99999,)),
        ],
    )


def create_backbone(
    model_cls: type, variant: str, pretrained: bool, filter_fn, feature_out_indices: int | tuple[int, ...], **kwargs
) -> nn.Module:
    """``build_model_with_cfg`` with ``filter_fn`` converting checkpoints and getter-based ``features_only``.

    ``feature_out_indices`` is the ``features_only`` default; an ``out_indices`` left in ``kwargs`` goes on to
    timm's builder, which lets it override that default.
    """
    return build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        pretrained_filter_fn=filter_fn,
        feature_cfg=dict(out_indices=feature_out_indices, feature_cls="getter"),
        **kwargs,
    )


def init_linear(module: nn.Module, weight_init) -> None:
    """``module.apply`` init of the families: ``weight_init(weight, std=0.02)`` for ``nn.Linear``, zero biases.

    ``weight_init`` is the reference's draw (``nn.init.trunc_normal_``, timm's ``trunc_normal_`` or
    ``nn.init.normal_``); the first two draw different numbers from one seed, so each family names its own.
    """
    if isinstance(module, nn.Linear):
        weight_init(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def imagenet_cfg(**kwargs) -> dict:
    """The pretrained-cfg fields every family shares (ImageNet-1k at 224 px, mean/std, bicubic, crop 0.875)."""
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        **kwargs,
    }


class StagedBackbone:
    """The stage half of timm's API for ``stem -> stages -> final norm`` models (mix in before ``nn.Module``).

    The model must define ``_forward_stem(x)`` (images to the first stage's input) and, when it differs from
    ``self.norm(x)``, ``_forward_norm(x)`` (last stage output to ``forward_features`` output). Stage outputs are in
    the layout ``self.output_fmt`` (``"NCHW"`` or ``"NHWC"``); ``forward_intermediates`` returns them as
    ``"NCHW"`` unless ``output_fmt`` asks for ``"NHWC"`` and that is allowed.
    """

    #: attribute holding the ``nn.Sequential`` of stages (each with a ``grad_checkpointing`` flag).
    stages_attr: str = "stages"
    #: layout of the stage outputs (and of ``forward_features``).
    output_fmt: str = "NCHW"
    #: ``output_fmt`` values ``forward_intermediates`` accepts.
    intermediate_fmts: tuple[str, ...] = ("NCHW",)
    #: the model ends in a norm ``self.norm``: ``forward_intermediates(norm=True)`` applies it to the last stage's
    #: output and ``prune_intermediate_layers(prune_norm=True)`` replaces it by ``nn.Identity``.
    has_final_norm: bool = True

    def _forward_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def _prune_head(self) -> None:
        """``prune_intermediate_layers(prune_head=True)``: drop the classifier."""
        self.reset_classifier(0, "")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in getattr(self, self.stages_attr):
            stage.grad_checkpointing = enable

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (strides 4, 8, 16, 32) and, unless ``intermediates_only``, the ``forward_features`` output.

        Args:
            x: images ``(B, C, H, W)``.
            indices: stages to return: None for all, an int ``n`` for the last ``n``, or a list of indices.
            norm: apply the final norm to the last stage's output (only where ``has_final_norm``).
            stop_early: skip the stages after the last requested one.
            output_fmt: one of ``intermediate_fmts``.
            intermediates_only: return only the list of stage outputs.

        Returns:
            ``intermediates`` or ``(features, intermediates)``.
        """
        check_output_fmt(output_fmt, self.intermediate_fmts)
        stages = getattr(self, self.stages_attr)
        take_indices, max_index = feature_take_indices(len(stages), indices)
        last = len(stages) - 1
        if stop_early and not torch.jit.is_scripting():
            stages = stages[: max_index + 1]
        x = self._forward_stem(x)
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                feat = self._forward_norm(x) if norm and self.has_final_norm and i == last else x
                if self.output_fmt == "NHWC" and output_fmt == "NCHW":
                    feat = feat.permute(0, 3, 1, 2)
                intermediates.append(feat)
        if intermediates_only:
            return intermediates
        return self._forward_norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last of ``indices`` (and optionally the final norm and the head)."""
        stages = getattr(self, self.stages_attr)
        take_indices, max_index = feature_take_indices(len(stages), indices)
        setattr(self, self.stages_attr, stages[: max_index + 1])
        if prune_norm and self.has_final_norm:
            self.norm = nn.Identity()
        if prune_head:
            self._prune_head()
        return take_indices


class ClassifierHeadMixin:
    """Classifier API of a model whose ``self.head`` is timm's ``ClassifierHead`` (mix in before ``nn.Module``)."""

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head.reset(num_classes, pool_type=global_pool, **get_device_dtype(self))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)


class LinearHeadMixin:
    """Classifier API of ``NCHW`` models with average pooling, ``self.head_drop`` and an ``nn.Linear`` ``self.head``."""

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is not None:
            check_global_pool(global_pool)
            self.global_pool = global_pool
        head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head = head.train(self.training)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool:
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

"""MAViT: the Magnitude-Aware Linear Attention (MALA) vision backbone.

Paper: "Rectifying Magnitude Neglect in Linear Attention", Qihang Fan, Huaibo Huang, Yuang Ai, Ran He, ICCV 2025
(highlight), arXiv 2507.00698.

    @inproceedings{fan2025rectifying,
      title={Rectifying Magnitude Neglect in Linear Attention},
      author={Qihang Fan and Huaibo Huang and Yuang Ai and Ran He},
      booktitle={ICCV},
      year={2025},
    }

Reference code: https://github.com/qhfan/MALA (``classfication_release/model.py``, classes ``MALA``,
``AddLinearAttention``; no licence file). Weights: https://huggingface.co/aldjalkdf/MAViT. Re-implemented for
visionattn on the shared MAViT/RAVLT skeleton (``_linear_vit.py``, which lists the layout changes); the released
models keep softmax attention in stages 3-4 (``attn_types``), ``attn_layout="linear"`` makes every stage MALA.
"""

from timm.models import generate_default_cfgs, register_model

from ._linear_vit import LinearViT, checkpoint_filter_fn, create_linear_vit, linear_vit_cfg

__all__ = ["MAViT", "checkpoint_filter_fn"]


class MAViT(LinearViT):
    """MAViT (arXiv 2507.00698): MALA in stages 1-2, softmax attention in stages 3-4, projection head."""


def _create_mavit(variant: str, pretrained: bool = False, **kwargs) -> MAViT:
    return create_linear_vit(MAViT, variant, pretrained, **kwargs)


def _cfg(file_name: str, **kwargs) -> dict:
    return linear_vit_cfg(
        "aldjalkdf/MAViT",
        file_name,
        paper_ids="arXiv:2507.00698",
        paper_name="Rectifying Magnitude Neglect in Linear Attention",
        origin_url="https://github.com/qhfan/MALA",
        **kwargs,
    )


# File names follow the RAVLT release (RAVLT_T.pth, ...); not verified against the MAViT hub listing.
default_cfgs = generate_default_cfgs(
    {
        "mavit_tiny.in1k": _cfg("MAViT_T.pth"),
        "mavit_small.in1k": _cfg("MAViT_S.pth"),
        "mavit_base.in1k": _cfg("MAViT_B.pth"),
        "mavit_large.in1k": _cfg("MAViT_L.pth"),
    }
)


@register_model
def mavit_tiny(pretrained: bool = False, **kwargs) -> MAViT:
    model_args = dict(
        embed_dims=(64, 128, 256, 512),
        depths=(2, 2, 6, 2),
        num_heads=(1, 2, 4, 8),
        attn_types=("mala", "mala", "softmax", "softmax"),
        mlp_ratios=3.5,
        layer_scale_init_values=(1.0, 1.0, 1.0, 1.0),
        projection_dim=2048,
        drop_path_rate=0.1,
    )
    return _create_mavit("mavit_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mavit_small(pretrained: bool = False, **kwargs) -> MAViT:
    model_args = dict(
        embed_dims=(64, 128, 320, 512),
        depths=(3, 5, 9, 3),
        num_heads=(1, 2, 5, 8),
        attn_types=("mala", "mala", "softmax", "softmax"),
        mlp_ratios=3.5,
        layer_scale_init_values=(1.0, 1.0, 1.0, 1.0),
        projection_dim=2048,
        drop_path_rate=0.15,
    )
    return _create_mavit("mavit_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mavit_base(pretrained: bool = False, **kwargs) -> MAViT:
    model_args = dict(
        embed_dims=(96, 192, 384, 512),
        depths=(4, 6, 12, 6),
        num_heads=(1, 2, 6, 8),
        attn_types=("mala", "mala", "softmax", "softmax"),
        mlp_ratios=3.5,
        layer_scale_init_values=(1.0, 1.0, 1e-6, 1e-6),
        projection_dim=2048,
        drop_path_rate=0.4,
    )
    return _create_mavit("mavit_base", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mavit_large(pretrained: bool = False, **kwargs) -> MAViT:
    model_args = dict(
        embed_dims=(96, 192, 448, 640),
        depths=(4, 7, 19, 8),
        num_heads=(1, 2, 7, 10),
        attn_types=("mala", "mala", "softmax", "softmax"),
        mlp_ratios=3.5,
        layer_scale_init_values=(1e-6, 1e-6, 1e-6, 1e-6),
        projection_dim=2560,
        drop_path_rate=0.55,
    )
    return _create_mavit("mavit_large", pretrained=pretrained, **dict(model_args, **kwargs))

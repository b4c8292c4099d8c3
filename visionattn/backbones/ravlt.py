"""RAVLT: the Rank-Augmented Vision Linear Transformer (RALA attention).

Paper: "Breaking the Low-Rank Dilemma of Linear Attention", Qihang Fan, Huaibo Huang, Ran He, CVPR 2025,
arXiv 2411.07635.

    @inproceedings{fan2025breaking,
      title={Breaking the Low-Rank Dilemma of Linear Attention},
      author={Qihang Fan and Huaibo Huang and Ran He},
      booktitle={CVPR},
      year={2025},
    }

Reference code: https://github.com/qhfan/RALA (``classfication/RALA.py``, classes ``RAVLT``,
``GateLinearAttentionNoSilu``; no licence file). Weights: https://huggingface.co/aldjalkdf/RAVLT (``RAVLT_{T,S,B,L}.pth``,
linked from the README). Re-implemented for visionattn on the shared MAViT/RAVLT skeleton (``_linear_vit.py``, which
lists the layout changes); the released models keep softmax attention in stages 3-4 (``attn_types``, confirmed by
the authors in qhfan/RALA issue #9), ``attn_layout="linear"`` makes every stage RALA.
"""

from timm.models import generate_default_cfgs, register_model

from ._linear_vit import LinearViT, checkpoint_filter_fn, create_linear_vit, linear_vit_cfg

__all__ = ["RAVLT", "checkpoint_filter_fn"]


class RAVLT(LinearViT):
    """RAVLT (arXiv 2411.07635): RALA in stages 1-2, softmax attention in stages 3-4, projection head."""


def _create_ravlt(variant: str, pretrained: bool = False, **kwargs) -> RAVLT:
    return create_linear_vit(RAVLT, variant, pretrained, **kwargs)


def _cfg(file_name: str, **kwargs) -> dict:
    return linear_vit_cfg(
        "aldjalkdf/RAVLT",
        file_name,
        paper_ids="arXiv:2411.07635",
        paper_name="Breaking the Low-Rank Dilemma of Linear Attention",
        origin_url="https://github.com/qhfan/RALA",
        **kwargs,
    )


default_cfgs = generate_default_cfgs(
    {
        "ravlt_tiny.in1k": _cfg("RAVLT_T.pth"),
        "ravlt_small.in1k": _cfg("RAVLT_S.pth"),
        "ravlt_base.in1k": _cfg("RAVLT_B.pth"),
        "ravlt_large.in1k": _cfg("RAVLT_L.pth"),
    }
)


@register_model
def ravlt_tiny(pretrained: bool = False, **kwargs) -> RAVLT:
    model_args = dict(
        embed_dims=(64, 128, 256, 512),
        depths=(2, 2, 6, 2),
        num_heads=(1, 2, 4, 8),
        attn_types=("rala", "rala", "softmax", "softmax"),
        mlp_ratios=3.5,
        layer_scale_init_values=(1.0, 1.0, 1.0, 1.0),
        projection_dim=1024,
        drop_path_rate=0.1,
    )
    return _create_ravlt("ravlt_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def ravlt_small(pretrained: bool = False, **kwargs) -> RAVLT:
    model_args = dict(
        embed_dims=(64, 128, 320, 512),
        depths=(3, 5, 9, 3),
        num_heads=(1, 2, 5, 8),
        attn_types=("rala", "rala", "softmax", "softmax"),
        mlp_ratios=3.5,
        layer_scale_init_values=(1.0, 1.0, 1.0, 1.0),
        projection_dim=1024,
        drop_path_rate=0.15,
    )
    return _create_ravlt("ravlt_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def ravlt_base(pretrained: bool = False, **kwargs) -> RAVLT:
    model_args = dict(
        embed_dims=(96, 192, 384, 512),
        depths=(4, 6, 12, 6),
        num_heads=(1, 2, 6, 8),
        attn_types=("rala", "rala", "softmax", "softmax"),
        mlp_ratios=3.5,
        layer_scale_init_values=(1.0, 1.0, 1e-6, 1e-6),
        projection_dim=1024,
        drop_path_rate=0.4,
    )
    return _create_ravlt("ravlt_base", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def ravlt_large(pretrained: bool = False, **kwargs) -> RAVLT:
    model_args = dict(
        embed_dims=(96, 192, 448, 640),
        depths=(4, 7, 19, 8),
        num_heads=(1, 2, 7, 10),
        attn_types=("rala", "rala", "softmax", "softmax"),
        mlp_ratios=3.5,
        layer_scale_init_values=(1e-6, 1e-6, 1e-6, 1e-6),
        projection_dim=1024,
        drop_path_rate=0.55,
    )
    return _create_ravlt("ravlt_large", pretrained=pretrained, **dict(model_args, **kwargs))

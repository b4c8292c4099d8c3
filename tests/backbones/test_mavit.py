"""MAViT (visionattn/backbones/mavit.py): the shared MAViT/RAVLT checks bound to the MAViT family."""

import pytest

from ._linear_vit_checks import (  # noqa: F401  (collected here, with this file's ``family``)
    Family,
    test_any_resolution_channels_last_and_amp,
    test_attn_layout_and_errors,
    test_converter_key_layout_all_variants,
    test_converter_unwraps_and_passes_native,
    test_features_only_and_intermediates,
    test_gpu_amp_train_step_matches_fp32,
    test_gpu_compile_matches_eager_gradients,
    test_gpu_triton_bf16_and_compile_match_reference,
    test_grad_checkpointing_keeps_output_and_gradients,
    test_macs_match_official_code,
    test_matches_official_forward,
    test_param_counts_match_official,
    test_pretrained_cfgs_point_at_official_hub,
    test_pretrained_loads_official_file,
    test_timm_head_api,
)

MAVIT = Family(
    prefix="mavit",
    kind="mala",
    projections=(2048, 2048, 2048, 2560),
    params=(16_449_128, 27_142_568, 49_792_648, 97_766_088),
    published_params_m=(16, 27, 50, 98),
    reference_gmacs=(2.6394, 4.9040, 10.6041, 17.2564),
    published_gflops=(2.5, 4.6, 9.9, 16.1),
    hub_id="aldjalkdf/MAViT",
    files=("MAViT_T.pth", "MAViT_S.pth", "MAViT_B.pth", "MAViT_L.pth"),
)


@pytest.fixture
def family() -> Family:
    return MAVIT

"""RAVLT (visionattn/backbones/ravlt.py): the shared MAViT/RAVLT checks bound to the RAVLT family."""

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

RAVLT = Family(
    prefix="ravlt",
    kind="rala",
    projections=(1024, 1024, 1024, 1024),
    params=(14_897_768, 25_591_208, 48_241_288, 95_242_440),
    published_params_m=(15, 26, 48, 95),
    reference_gmacs=(2.6133, 4.8784, 10.5795, 17.2089),
    published_gflops=(2.4, 4.6, 9.9, 16.0),
    hub_id="aldjalkdf/RAVLT",
    files=("RAVLT_T.pth", "RAVLT_S.pth", "RAVLT_B.pth", "RAVLT_L.pth"),
)


@pytest.fixture
def family() -> Family:
    return RAVLT

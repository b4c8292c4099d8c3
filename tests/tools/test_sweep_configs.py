import pytest
import torch

from tools import sweep_configs


def test_sweep_configs_masks_and_config_parsing():
    masks = {label.split()[0]: mask for label, *_, mask in sweep_configs._masks("cpu")}
    assert masks["FLUX-2048"].density() == 1.0 and not masks["FLUX-2048"].partial.any()
    assert not masks["HunyuanVideo"].partial.any()  # the GNA stride case: every kept block full
    assert float(masks["Wan"].partial.float().mean()) > 0.5  # the mostly-partial case
    config = sweep_configs._config("128,64,4,3")
    assert config.kwargs == {"TILE_M": 128, "TILE_N": 64} and (config.num_warps, config.num_stages) == (4, 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a CUDA device")
def test_sweep_configs_needs_cuda():
    with pytest.raises(SystemExit, match="CUDA"):
        sweep_configs.main([])

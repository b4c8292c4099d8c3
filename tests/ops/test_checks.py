import pytest
import torch

from visionattn.ops._checks import (
    _check_attention_inputs,
    _check_choice,
    _check_per_axis,
    _check_per_axis_bool,
    _check_scale,
)
from visionattn.ops._registry import _BackendRegistry


def test_check_per_axis_broadcasts_and_validates():
    assert _check_per_axis("kernel_size", 3, 5) == (5, 5, 5)
    assert _check_per_axis("kernel_size", 2, (3, 7)) == (3, 7)
    with pytest.raises(ValueError, match="kernel_size"):
        _check_per_axis("kernel_size", 2, (3, 7, 9))
    with pytest.raises(ValueError, match="stride"):
        _check_per_axis("stride", 1, 0)
    with pytest.raises(TypeError, match="dilation"):
        _check_per_axis("dilation", 2, 1.5)
    with pytest.raises(TypeError, match="dilation"):
        _check_per_axis("dilation", 2, True)
    assert _check_per_axis_bool("causal", 2, True) == (True, True)
    with pytest.raises(TypeError, match="causal"):
        _check_per_axis_bool("causal", 2, (True,))


def test_check_attention_inputs_names_the_argument():
    q = torch.randn(2, 3, 5, 8)
    _check_attention_inputs(q, q, q)
    with pytest.raises(ValueError, match="q must have 4 dims"):
        _check_attention_inputs(q[0], q, q)
    with pytest.raises(TypeError, match="dtype"):
        _check_attention_inputs(q, q.double(), q)
    with pytest.raises(ValueError, match="batch and head"):
        _check_attention_inputs(q, q[:1], q[:1])
    with pytest.raises(ValueError, match="same length"):
        _check_attention_inputs(q, q, q[:, :, :4])
    with pytest.raises(ValueError, match="head dim"):
        _check_attention_inputs(q, q[..., :4], q)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        _check_attention_inputs(q, None, q)
    assert not _check_attention_inputs(q, q[..., :4], q, raise_error=False)


def test_check_scale_and_choice():
    assert _check_scale(None, 16) == 0.25
    assert _check_scale(0.5, 16) == 0.5
    with pytest.raises(ValueError, match="scale"):
        _check_scale(0.0, 16)
    with pytest.raises(TypeError, match="scale"):
        _check_scale("1", 16)
    with pytest.raises(ValueError, match="feature_map"):
        _check_choice("feature_map", "tanh", ("elu1", "relu"))


def test_registry_prefers_first_passing_backend_and_names_failures():
    registry = _BackendRegistry("toy")
    calls = []

    def never(args, raise_error):
        if raise_error:
            raise NotImplementedError("x must be on CUDA for backend='fast'")
        return False

    registry.register("fast", [never])(lambda: calls.append("fast"))
    registry.register("reference")(lambda: calls.append("reference"))
    registry.select(None, {})()
    assert calls == ["reference"]
    with pytest.raises(NotImplementedError, match="backend='fast'"):
        registry.select("fast", {})
    with pytest.raises(ValueError, match="backend must be one of"):
        registry.select("cuda", {})

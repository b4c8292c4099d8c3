"""tools/profile_model.py: images/s header and the profiler's kernel table, on CPU with a tiny input."""

import re

import pytest

from tools.profile_model import _kwargs, main


def test_profile_model_reports_throughput_and_top_ops(capsys):
    report = main(["vig_tiny", "--img-size", "64", "--batch", "1", "--dtype", "fp32", "--device", "cpu",
                   "--warmup", "1", "--iters", "1", "--rows", "5", "--kwargs", "num_classes=10"])  # fmt: skip
    header = report.splitlines()[0]
    match = re.match(r"vig_tiny 64px B1 fp32: [\d.]+ ms per forward, \d+ img/s, activation peak ([\d.]+) MiB$", header)
    assert match, header
    # 16 tokens x 192 channels x 4 bytes per (B, N, C) activation: the peak holds several, far below the weights
    assert 0.01 < float(match.group(1)) < 5
    assert "aten::" in report and header in capsys.readouterr().out


def test_profile_model_kwargs_parse_literals_and_reject_bad_pairs():
    assert _kwargs(["img_size=1024", "attn_layout=linear"]) == {"img_size": 1024, "attn_layout": "linear"}
    with pytest.raises(SystemExit, match="key=value"):
        _kwargs(["img_size"])

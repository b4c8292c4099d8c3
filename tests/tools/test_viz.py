import pytest
import torch

from tools.viz import _parse_args, attended_row, build
from tools.viz import main as viz_main

CASES = [
    ["neighborhood", "--grid", "12", "10", "--kernel-size", "5", "--tile", "4", "4", "--query", "1", "8"],
    ["neighborhood", "--grid", "3", "8", "8", "--kernel-size", "3", "5", "5", "--stride", "1", "2", "2", "--causal"],
    ["circle", "--grid", "16", "16", "--radius", "5", "--extra-before", "8", "--tile", "4", "4"],
    ["radial", "--grid", "6", "8", "8", "--block-size", "64"],
    ["routing", "--grid", "14", "14", "--regions", "7", "7", "--topk", "3"],
    ["sla", "--grid", "16", "16", "--block-size", "32", "--ratio", "0.25"],
]


@pytest.mark.parametrize("argv", CASES, ids=lambda a: a[0] + "-" + "x".join(a[2:4]))
def test_viz_writes_png_and_row_matches_dense_mask(argv, tmp_path):
    out = tmp_path / "mask.png"
    assert viz_main([*argv, "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 2000
    mask, _ = build(_parse_args([*argv, "--out", str(out)]))
    dense = mask.to_dense()[0, 0]
    for position in torch.linspace(0, mask.q_len - 1, 5).long().tolist():
        assert torch.equal(attended_row(mask, position), dense[position])


@pytest.mark.parametrize(
    "argv",
    [
        ["radial", "--grid", "8", "8"],
        ["neighborhood", "--grid", "8", "8", "--query", "9", "0"],
        ["routing", "--grid", "8", "8", "--regions", "2"],
        ["neighborhood", "--grid", "2", "2", "2", "2"],
    ],
)
def test_viz_rejects_bad_arguments(argv, tmp_path):
    with pytest.raises(SystemExit):
        viz_main([*argv, "--out", str(tmp_path / "x.png")])

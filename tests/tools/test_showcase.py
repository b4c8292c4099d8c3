from tools.showcase import main as showcase_main


def test_showcase_every_op_matches_its_reference(capsys):
    assert showcase_main() == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out
    for op in ("neighborhood_attention", "block_sparse_attention", "linear_attention", "gated_linear_attention"):
        assert op in out

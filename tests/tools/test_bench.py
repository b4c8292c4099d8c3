import json

from tools.bench import main as bench_main


def test_bench_cpu_mode_runs_end_to_end_and_writes_outputs(tmp_path):
    out = tmp_path / "attention"
    # one case module keeps CI fast; every module's CPU mode is run by `make bench-cpu`
    argv = ["attention", "--cases", "gated", "--device", "cpu", "--iters", "1", "--warmup", "0", "--out", str(out)]
    code = bench_main(argv)
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["environment"]["device"]
    rows = report["rows"]
    assert rows, "the attention suite produced no rows"
    timed = [r for r in rows if "ms" in r]
    assert timed, f"no row ran: {rows}"
    assert all(r["ms"] > 0 for r in timed)
    assert out.with_suffix(".md").read_text().startswith("- date:")
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert code == 0


def test_bench_rejects_unknown_case_module():
    import pytest

    with pytest.raises(SystemExit):
        bench_main(["attention", "--cases", "not_a_case", "--device", "cpu"])

import json

import torch

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


def test_bench_builds_only_the_selected_rows(monkeypatch, tmp_path):
    """``--filter``, ``--impl`` and ``--mode`` select rows before any ``make`` runs; each row reports its warm-up."""
    import sys
    import types

    from tools.bench import _parse_args, run_cases
    from tools.bench_cases._common import BenchCase, timed

    built = []

    def row(group, impl, mode):
        def make():
            built.append((group, impl, mode))
            x = torch.ones(4, requires_grad=mode != "fwd")
            return timed(lambda t: (t * 2).sum(), (x,), mode)

        return BenchCase(group=group, impl=impl, mode=mode, make=make, baseline=impl == "sdpa")

    impls = ("ours", "ours-causal", "sdpa", "flex")
    rows = [row(g, i, m) for g in ("keep A", "drop B") for m in ("fwd", "fwd+bwd") for i in impls]
    monkeypatch.setitem(sys.modules, "tools.bench_cases._fake", types.SimpleNamespace(cases=lambda args: rows))
    # "=ours" selects that impl exactly (not ours-causal), "fl" any impl containing it
    argv = ["attention", "--device", "cpu", "--iters", "1", "--warmup", "1", "--filter", "keep", "--impl", "=ours,fl"]
    args = _parse_args([*argv, "--mode", "fwd+bwd"])
    args.case_names = ["_fake"]
    report = run_cases(args)
    assert built == [("keep A", "ours", "fwd+bwd"), ("keep A", "flex", "fwd+bwd")]
    assert [(r["group"], r["impl"], r["mode"]) for r in report] == built
    assert all(r["ms"] > 0 and r["warmup_s"] >= 0 and r["build_s"] >= 0 for r in report)


def test_bench_case_modules_describe_rows_without_running_anything():
    """``cases(args)`` of every module allocates and computes nothing: all work is in the rows' ``make``."""
    import importlib

    from torch.utils._python_dispatch import TorchDispatchMode

    from tools.bench import SUITES, _parse_args

    class RecordOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    for suite, names in SUITES.items():
        args = _parse_args([suite, "--device", "cpu"])
        for name in names:
            module = importlib.import_module(f"tools.bench_cases.{name}")
            with RecordOps() as record:
                cases = module.cases(args)
            assert cases and record.ops == [], f"{name}: cases() ran {record.ops[:5]}"
    with RecordOps() as record:  # the recorder does see a row's work
        cases[0].make()
    assert record.ops

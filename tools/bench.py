"""Benchmark CLI: ours and the peers side by side in one run, written as JSON + markdown + PNG.

    python tools/bench.py attention --cases block_sparse,linear --mode both --out docs/benchmarks/attention
    python tools/bench.py models --cases models_vig
    python tools/bench.py diffusion
    python tools/bench.py attention --device cpu          # tiny shapes: checks that everything runs

Each case module in ``tools/bench_cases`` describes ``BenchCase`` rows (see ``_common.py``) without building them.
``--mode``, ``--filter`` (group substring) and ``--impl`` (impl substrings, or ``=name`` for exactly one) select rows first; then each selected
row is built (its ``make`` allocates inputs, models), warmed up (compilation, autotuning: ``warmup_s``), timed with
CUDA events (median of ``--iters``), its peak memory recorded, and freed before the next. Rows that fail (e.g. out
of memory, a peer that is not installed) are reported with the error instead of stopping the run.

    python tools/bench.py attention --cases block_sparse --filter FLUX --impl ours,flex --mode fwd
"""

import argparse
import datetime
import gc
import importlib
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import torch  # noqa: E402  (importing torch does not import triton)

# Kernels run under the Triton interpreter on CPU; it must be chosen before anything imports triton.
if "cpu" in sys.argv or not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from tools.bench_cases._common import BenchCase  # noqa: E402

SUITES = {
    "attention": ("block_sparse", "neighborhood", "linear", "gated", "sparse_linear"),
    "layers": ("gated_norm", "swiglu"),
    "models": ("models_mavit", "models_biformer", "models_vig"),
    "diffusion": ("diffusion",),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=sorted(SUITES), help="which group of case modules to run")
    parser.add_argument("--cases", default=None, help="comma-separated case modules (default: all of the suite)")
    parser.add_argument("--mode", default="both", choices=("fwd", "fwd+bwd", "both"))
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls per row (default 5 on CUDA, 1 on CPU)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per row (default 20 on CUDA, 2 on CPU)")
    parser.add_argument("--filter", default=None, help="only rows whose group contains this substring")
    parser.add_argument(
        "--impl",
        default=None,
        help="only rows whose impl contains one of these comma-separated substrings ('=name': exactly name)",
    )
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="also time each row replayed from a CUDA graph (GPU time without Python/launch overhead): graph_ms",
    )
    parser.add_argument("--out", default=None, help="output path prefix for .json/.md/.png (default: print only)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but no CUDA device is available; use --device cpu")
    args.dtype = DTYPES[args.dtype]
    on_gpu = args.device == "cuda"
    args.warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    args.iters = args.iters if args.iters is not None else (20 if on_gpu else 2)
    names = args.cases.split(",") if args.cases else SUITES[args.suite]
    unknown = [n for n in names if not (pathlib.Path(__file__).parent / "bench_cases" / f"{n}.py").exists()]
    if unknown and args.cases:
        parser.error(f"--cases has unknown case modules {unknown}; available: {_available_cases()}")
    args.case_names = [n for n in names if n not in unknown]
    return args


def _available_cases() -> list[str]:
    folder = pathlib.Path(__file__).parent / "bench_cases"
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


def _time_row(case: BenchCase, args) -> dict:
    """Build the row (``case.make``), warm it up, then its median milliseconds and peak memory. The callable and its
    inputs are local to this frame, so they are freed when it returns."""
    on_gpu = args.device == "cuda"
    sync = torch.cuda.synchronize if on_gpu else lambda: None
    t0 = time.perf_counter()
    fn = case.make()
    sync()
    t1 = time.perf_counter()
    for _ in range(args.warmup):
        fn()
    sync()
    t2 = time.perf_counter()
    times = []
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(args.iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        graph = _time_graph(fn, args.iters) if args.cuda_graph else {}
    else:
        for _ in range(args.iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        peak_mb = None
        graph = {}
    return {"ms": statistics.median(times), "peak_mb": peak_mb, "build_s": t1 - t0, "warmup_s": t2 - t1, **graph}


def _time_graph(fn, iters: int) -> dict:
    """Median milliseconds of ``fn`` captured once into a CUDA graph and replayed: the GPU time of the row without
    the host's Python and launch overhead (what ``torch.compile(mode="reduce-overhead")`` users see). A row that
    cannot be captured (a host sync, an allocation it cannot replay) reports why instead."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize()
    except Exception as exc:  # reported in the row, the eager timing stands
        return {"graph_error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"}
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return {"graph_ms": statistics.median(times)}


def _row_metrics(case: BenchCase, timing: dict) -> dict:
    ms = timing["ms"]
    density = case.density() if callable(case.density) else case.density
    row = {
        "group": case.group,
        "impl": case.impl,
        "mode": case.mode,
        "ms": round(ms, 4),
        "peak_mb": None if timing["peak_mb"] is None else round(timing["peak_mb"], 1),
        "density": density,
        "note": case.note,
        "baseline": case.baseline,
        "build_s": round(timing["build_s"], 3),
        "warmup_s": round(timing["warmup_s"], 3),
    }
    if "graph_ms" in timing:
        row["graph_ms"] = round(timing["graph_ms"], 4)
        if case.bytes:
            row["graph_gb_per_s"] = round(case.bytes / (timing["graph_ms"] * 1e-3) / 1e9, 1)
    if "graph_error" in timing:
        row["note"] = (row["note"] + "; " if row["note"] else "") + "no CUDA graph: " + timing["graph_error"]
    if case.flops:
        row["tflops_dense_equiv"] = round(case.flops / (ms * 1e-3) / 1e12, 2)
    if case.bytes:
        row["gb_per_s"] = round(case.bytes / (ms * 1e-3) / 1e9, 1)
    if case.items:
        row["items_per_s"] = round(case.items / (ms * 1e-3), 1)
    return row


def _add_speedups(rows: list[dict]) -> None:
    """Speedup vs the baseline row of the same group and mode, and the fraction of the ideal 1/density."""
    baselines = {(r["group"], r["mode"]): r for r in rows if r.get("baseline") and "ms" in r}
    for row in rows:
        base = baselines.get((row["group"], row["mode"]))
        if base is None or "ms" not in row:
            continue
        row["speedup"] = round(base["ms"] / row["ms"], 3)
        if row.get("density"):
            row["fraction_of_ideal"] = round(row["speedup"] * row["density"], 3)


def _selected(case: BenchCase, args) -> bool:
    """``--mode``, ``--filter`` and ``--impl`` decide from the row's description alone, before anything is built."""
    if args.mode not in ("both", case.mode) or (args.filter and args.filter not in case.group):
        return False
    parts = [part for part in (args.impl or "").split(",") if part]
    return not parts or any(case.impl == part[1:] if part[0] == "=" else part in case.impl for part in parts)


def _run_row(case: BenchCase, args) -> dict:
    print(f"[bench] {case.group} | {case.impl} | {case.mode}", flush=True)
    try:
        row = _row_metrics(case, _time_row(case, args))
        print(f"[bench]   {row['ms']} ms (build {row['build_s']:.1f} s, warm-up {row['warmup_s']:.1f} s)", flush=True)
    except Exception as exc:
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        print(f"[bench]   error: {msg}", flush=True)
        row = {"group": case.group, "impl": case.impl, "mode": case.mode, "error": msg}
    # a failed row's traceback can hold its tensors in reference cycles: collect them before the next row
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return row


def _run_module(name: str, args, rows: list[dict], on_row) -> None:
    """The rows of one case module; its case list (and any group memo it holds) is freed on return."""
    module = importlib.import_module(f"tools.bench_cases.{name}")
    t0 = time.perf_counter()
    try:
        cases = [case for case in module.cases(args) if _selected(case, args)]
    except Exception as exc:  # a case module whose peers are missing still lets the others run
        rows.append({"group": name, "impl": "-", "mode": "-", "error": f"{type(exc).__name__}: {exc}"})
        return
    print(f"[bench] {name}: {len(cases)} rows selected ({time.perf_counter() - t0:.2f} s to describe)", flush=True)
    for case in cases:
        rows.append(_run_row(case, args))
        if on_row is not None:
            on_row(rows)


def run_cases(args, on_row=None) -> list[dict]:
    """Time every selected row; ``on_row(rows)`` runs after each one (the CLI rewrites its outputs there, so a run
    stopped by a time limit keeps what it measured)."""
    rows = []
    for name in args.case_names:
        _run_module(name, args, rows, on_row)
    _add_speedups(rows)
    return rows


def environment() -> dict:
    import triton

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "command": "python " + " ".join(sys.argv),
    }
    return env


_COLUMNS = (
    ("impl", "impl"),
    ("ms", "ms"),
    ("graph_ms", "CUDA-graph ms"),
    ("speedup", "speedup"),
    ("density", "density"),
    ("fraction_of_ideal", "of ideal"),
    ("tflops_dense_equiv", "TFLOP/s (dense-eq)"),
    ("gb_per_s", "GB/s"),
    ("graph_gb_per_s", "GB/s (graph)"),
    ("items_per_s", "items/s"),
    ("peak_mb", "peak MB"),
    ("warmup_s", "warm-up s"),
    ("note", "note"),
)


def to_markdown(rows: list[dict], env: dict) -> str:
    lines = [f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}" for k, v in env.items()]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["group"], row["mode"]), []).append(row)
    for (group, mode), members in groups.items():
        cols = [c for c in _COLUMNS if any(r.get(c[0]) not in (None, "") for r in members)]
        lines += ["", f"### {group} — {mode}", "", "| " + " | ".join(h for _, h in cols) + " | error |"]
        lines.append("|" + "---|" * (len(cols) + 1))
        for r in members:
            cells = ["" if r.get(k) in (None, "") else str(r[k]) for k, _ in cols]
            lines.append("| " + " | ".join(cells) + f" | {r.get('error', '')} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if "ms" in r]
    if not timed:
        return
    use_speedup = all("speedup" in r for r in timed)
    labels = [f"{r['group'][:40]}\n{r['mode']} {r['impl']}" for r in timed]
    fig, ax = plt.subplots(figsize=(10, max(3, 0.3 * len(timed))))
    ax.barh(range(len(timed)), [r["speedup"] if use_speedup else r["ms"] for r in timed])
    ax.set_yticks(range(len(timed)), labels, fontsize=6)
    if use_speedup:
        ax.axvline(1.0, color="k", lw=0.5)
    ax.set_xlabel("speedup vs the baseline of its group" if use_speedup else "milliseconds (median)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write(rows: list[dict], env: dict, out: pathlib.Path | None) -> str:
    rows = [dict(r) for r in rows]
    _add_speedups(rows)
    text = to_markdown(rows, env)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
        out.with_suffix(".md").write_text(text)
    return text


def main(argv=None) -> int:
    args = _parse_args(argv)
    env = environment()
    out = pathlib.Path(args.out) if args.out else None
    rows = run_cases(args, on_row=lambda partial: _write(partial, env, out))
    text = _write(rows, env, out)
    print(text)
    if out is not None:
        plot(rows, out.with_suffix(".png"))
    return 1 if rows and all("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

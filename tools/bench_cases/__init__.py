"""Benchmark case modules loaded by ``tools/bench.py``: one module per op family or model group."""

"""Shared test fixtures: interpreter mode, devices, tolerances, poisoned allocations and ``assert_close``.

On a machine without a CUDA device, Triton kernels run under ``TRITON_INTERPRET=1`` (set here, before anything
imports triton) on tiny CPU tensors; on the H100 the same tests run natively at real sizes.
"""

import os

import torch  # importing torch does not import triton, so the interpreter can still be chosen below

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests._numerics import TOLERANCES, assert_close  # noqa: E402,F401

_ON_GPU = torch.cuda.is_available()

if os.environ.get("PYTEST_XDIST_WORKER"):
    # xdist already runs one process per core: intra-op threads on top oversubscribe the CPU (5-50x slower).
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if _ON_GPU:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (runs on the H100 with `make gpu-test`)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def kernel_device() -> torch.device:
    """Device for Triton kernel tests: CUDA when present, else CPU under the Triton interpreter."""
    if _ON_GPU:
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA device and TRITON_INTERPRET is not 1")
    return torch.device("cpu")


@pytest.fixture
def kernel_dtypes() -> tuple[torch.dtype, ...]:
    """Low-precision dtypes a kernel test may use here: bf16 only on GPU (the interpreter's bf16 tl.dot is wrong)."""
    return (torch.float16, torch.bfloat16) if _ON_GPU else (torch.float16,)


@pytest.fixture
def poison_empty(monkeypatch):
    """NaN-poison ``torch.empty``/``empty_like`` so a kernel that leaves an output element unwritten fails loudly."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def _poison(t):
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(-(2**30))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(real_empty_like(*a, **k)))
    yield


@pytest.fixture
def rng() -> torch.Generator:
    """A freshly seeded generator per test (fixed seed: failures reproduce)."""
    return torch.Generator().manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_launch_records(monkeypatch):
    """Every test starts with no recorded launch configs (``kernels/_launch.launch`` replays the config it recorded
    per call signature), so the config a test pins is the one that runs."""
    from visionattn.kernels import _launch

    monkeypatch.setattr(_launch, "_RESOLVED", {})

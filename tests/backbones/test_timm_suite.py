"""timm's own ``tests/test_models.py`` run against the visionattn model names (the timm conformance check).

The test file comes from the sdist of the installed timm version (``pip download --no-deps --no-binary :all:
timm==<installed>``, cached under ``.cache/timm-sdist/``): it must match the installed package exactly. It runs in a
subprocess with ``TORCH_BACKEND=visionattn`` (test_models.py imports that module before it lists the models, so
ours are registered), selected by model name, with ``-k "not pretrained"`` (those tests download weights).

When it runs:

- ``VISIONATTN_TIMM_SUITE=1`` (``make test-timm``): every visionattn model name, or the comma-separated names in
  ``VISIONATTN_TIMM_SUITE_MODELS``;
- in CI (env ``CI`` set): only :data:`CI_MODEL_NAMES` (about 35 s per name on 2 cores);
- otherwise skipped.

Each family adds its names to :data:`CI_MODEL_NAMES` (its ``*_tiny`` and one larger variant where CI time allows).

timm selects its ``test_model_forward_intermediates`` and ``test_model_forward_intermediates_features`` by its own
model modules (``FEAT_INTER_FILTERS``), so the subprocess never runs them for visionattn names;
:func:`test_timm_forward_intermediates_checks` runs their checks in this process, for the same names, or for each
family's ``*_tiny`` name when the suite itself is skipped.
"""

import fnmatch
import importlib.metadata
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import timm
import torch

import visionattn  # noqa: F401  (registers the models)

#: Model names the CI machine runs timm's suite for: each family's tiny and small (the smallest larger variant;
#: Agent-Swin-S adds the shifted window blocks and the 288 cfg tag, Agent-DeiT-S the 448 tag). Measured with -n 2 on
#: the 2-core machine (2026-11-22): the eight tiny names 83 s, the eight small names 149 s (biformer_small 65 s,
#: the others 18-37 s each).
CI_MODEL_NAMES = [
    "agent_deit_small",
    "agent_deit_tiny",
    "agent_pvt_small",
    "agent_pvt_tiny",
    "agent_swin_small",
    "agent_swin_tiny",
    "biformer_small",
    "biformer_tiny",
    "mavit_small",
    "mavit_tiny",
    "ravlt_small",
    "ravlt_tiny",
    "vig_h_small",
    "vig_h_tiny",
    "vig_small",
    "vig_tiny",
]

#: timm tests deselected for every visionattn model, each with its reason.
DESELECTED = {
    "pretrained": "downloads weights from the hub (no network in tests)",
    "torchscript": "TokenGrid (a frozen dataclass) and the ops' Python backend dispatch are not TorchScript-compatible",
}

#: timm tests deselected for some visionattn models only: model-name pattern -> {test name: reason}.
DESELECTED_FOR = {
    "agent_deit_*": {
        "test_model_default_cfgs": "ViT-style token output with a cls token, which timm checks with "
        "test_model_default_cfgs_non_std, selected only by timm's own name list (deit*); the same checks, with the "
        "spatial pool_size check stated for tokens, run in test_agent_cfgs.py::test_agent_deit_default_cfg_contract",
    },
}

_REPO_ROOT = Path(__file__).resolve().parents[2]
_CACHE_DIR = _REPO_ROOT / ".cache" / "timm-sdist"


def _visionattn_model_names() -> list[str]:
    return sorted(n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith("visionattn."))


def _selected_names() -> list[str]:
    if os.environ.get("VISIONATTN_TIMM_SUITE") == "1":
        requested = os.environ.get("VISIONATTN_TIMM_SUITE_MODELS", "")
        return [n.strip() for n in requested.split(",") if n.strip()] or _visionattn_model_names()
    if os.environ.get("CI"):
        return list(CI_MODEL_NAMES)
    return []


def _timm_test_file() -> Path:
    """``tests/test_models.py`` of the installed timm version, downloaded once into the cache."""
    version = importlib.metadata.version("timm")
    root = _CACHE_DIR / f"timm-{version}"
    test_file = root / "tests" / "test_models.py"
    if test_file.exists():
        return test_file
    _CACHE_DIR.mkdir(parents=True, exist_ok=True)
    archive = _CACHE_DIR / f"timm-{version}.tar.gz"
    if not archive.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
            + [f"timm=={version}", "-d", str(_CACHE_DIR)],
            check=True,
        )
    with tarfile.open(archive) as tar:
        members = [
            m
            for m in tar.getmembers()
            if m.name.startswith(f"timm-{version}/tests/") or m.name.endswith("pyproject.toml")
        ]
        tar.extractall(_CACHE_DIR, members=members, filter="data")
    return test_file


_NAMES = _selected_names()


@pytest.mark.skipif(not _NAMES, reason="timm's suite runs with VISIONATTN_TIMM_SUITE=1 (make test-timm) or in CI")
@pytest.mark.parametrize("model_name", _NAMES or ["none"])
def test_timm_suite_passes(model_name):
    assert model_name in _visionattn_model_names(), f"{model_name} is not a visionattn model"
    test_file = _timm_test_file()
    root = test_file.parents[1]
    keys = list(DESELECTED)
    keys += [
        test for pattern, tests in DESELECTED_FOR.items() if fnmatch.fnmatch(model_name, pattern) for test in tests
    ]
    deselect = " and ".join(f"not {key}" for key in keys)
    env = dict(os.environ, TORCH_BACKEND="visionattn", PYTHONPATH=str(_REPO_ROOT))
    # A user's CPU: no Triton interpreter (our conftest sets it), no GitHub-runner exclusions.
    for key in ("GITHUB_ACTIONS", "TRITON_INTERPRET"):
        env.pop(key, None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(test_file), "-q", "-p", "no:cacheprovider", "--rootdir", str(root)]
        + ["-c", str(root / "pyproject.toml"), "-k", f"{model_name} and {deselect}", "-W", "ignore"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    summary = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, f"timm test_models.py failed for {model_name}:\n{summary}"
    assert " passed" in result.stdout, f"no timm test selected for {model_name}:\n{summary}"


#: Input of the intermediates checks: timm's ``TARGET_FFEAT_SIZE`` (96) made non-square and not a multiple of 16 or
#: 32, so that padding / ceil-mode paths run too (Agent-DeiT pads to 96x80, BiFormer pads its maps to ``n_win``).
_FEATURE_INPUT = (1, 3, 96, 72)


@pytest.mark.parametrize("model_name", _NAMES or [n for n in CI_MODEL_NAMES if n.endswith("_tiny")])
def test_timm_forward_intermediates_checks(model_name):
    """timm's ``test_model_forward_intermediates`` + ``..._features`` checks (tests/test_models.py), full-size model.

    ``features_only`` (getter) and ``forward_intermediates(output_fmt="NCHW")``: one map per ``feature_info`` entry
    (at least 3) with its channels, at most ``ceil(size / reduction) + 1`` per side, no NaN; the
    ``forward_intermediates`` output equals ``forward_features`` and is unchanged by gradient checkpointing.
    """
    torch.manual_seed(0)
    x = torch.randn(_FEATURE_INPUT)
    features = timm.create_model(model_name, pretrained=False, features_only=True, feature_cls="getter").eval()
    model = timm.create_model(model_name, pretrained=False).eval()
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    assert len(info.channels()) >= 3
    with torch.no_grad():
        checked = [(features.feature_info.channels(), features.feature_info.reduction(), features(x))]
        output, intermediates = model.forward_intermediates(x, output_fmt="NCHW")
        checked.append((info.channels(), info.reduction(), intermediates))
        for channels, reductions, maps in checked:
            assert len(maps) == len(channels)
            for c, r, o in zip(channels, reductions, maps):
                assert o.shape[0] == 1 and o.shape[1] == c
                assert all(o.shape[2 + i] <= math.ceil(_FEATURE_INPUT[2 + i] / r) + 1 for i in range(2))
                assert not torch.isnan(o).any()
        torch.testing.assert_close(output, model.forward_features(x), rtol=1e-5, atol=1e-8)
        model.set_grad_checkpointing()
        torch.testing.assert_close(output, model.forward_intermediates(x, output_fmt="NCHW")[0], rtol=1e-4, atol=1e-5)

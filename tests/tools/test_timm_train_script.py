"""timm's own ``train.py`` trains a visionattn model when given ``--device-modules visionattn``.

``train.py`` is not in timm's wheel or sdist and tests have no network, so the script is supplied by path:
``VISIONATTN_TIMM_TRAIN_PY=/path/to/train.py`` (``git show v<timm version>:train.py`` from a clone of
huggingface/pytorch-image-models). Without it the tests skip. They are marked ``slow`` (deselected in CI):
about 30 s for both on 2 cores.

The script runs in a subprocess on a small ImageFolder written from scikit-learn's digits (no download).
``--device-modules`` imports the named modules before ``create_model``, which registers our models; the second test
checks that the same command without the flag fails, so the first one passes because of the flag.
"""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from sklearn.datasets import load_digits

import visionattn  # noqa: F401  (registers the models for the checkpoint check)

_ENV_VAR = "VISIONATTN_TIMM_TRAIN_PY"
_REPO_ROOT = Path(__file__).resolve().parents[2]
_MODEL = "mavit_tiny"
_EPOCHS = 3

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def train_py() -> Path:
    """Path of timm's ``train.py`` from the environment; skip when unset, fail when set to a missing file."""
    value = os.environ.get(_ENV_VAR)
    if not value:
        pytest.skip(f"set {_ENV_VAR} to timm's train.py (not shipped in the timm package; see docs/timm_train.md)")
    path = Path(value)
    if not path.is_file():
        pytest.fail(f"{_ENV_VAR}={value} is not a file")
    return path


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> Path:
    """ImageFolder tree ``train/<class>/*.png`` and ``validation/<class>/*.png``: 50 + 20 digits per class, 32x32 RGB."""
    root = tmp_path_factory.mktemp("digits_if")
    digits = load_digits()
    for label in range(10):
        indices = np.flatnonzero(digits.target == label)[:70]
        for i, index in enumerate(indices):
            folder = root / ("train" if i < 50 else "validation") / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[index] * (255 / 16)).astype(np.uint8)
            image = Image.fromarray(pixels).resize((32, 32), Image.NEAREST).convert("RGB")
            image.save(folder / f"{index}.png")
    return root


def _run_train_py(train_py: Path, data: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        str(train_py),
        "--data-dir", str(data),
        "--train-split", "train",
        "--val-split", "validation",
        "--model", _MODEL,
        "--num-classes", "10",
        "--img-size", "32",
        "--device", "cpu",
        "--workers", "0",
        "--no-prefetcher",
        "--epochs", str(_EPOCHS),
        "-b", "25",
        "--opt", "adamw",
        "--lr", "1e-3",
        "--weight-decay", "0.05",
        "--warmup-epochs", "0",
        "--seed", "0",
        "--output", str(output),
        "--experiment", "run",
        *extra,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(_REPO_ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run(command, cwd=output, env=env, capture_output=True, text=True, timeout=900)


def test_timm_train_py_trains_with_device_modules(train_py, digits_folder, tmp_path):
    result = _run_train_py(train_py, digits_folder, tmp_path, "--device-modules", "visionattn")
    assert result.returncode == 0, f"timm train.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert f"Model {_MODEL} created" in result.stdout + result.stderr

    run = tmp_path / "run"
    with open(run / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["epoch"]) for row in rows] == list(range(_EPOCHS))
    train_loss = [float(row["train_loss"]) for row in rows]
    top1 = [float(row["eval_top1"]) for row in rows]
    assert all(math.isfinite(v) for v in train_loss + top1)
    # it learns: the training loss falls and the last validation top-1 beats chance (10%); measured 45% on digits
    assert train_loss[-1] < train_loss[0], train_loss
    assert top1[-1] > 25.0, top1

    for name in ("last.pth.tar", "model_best.pth.tar"):
        assert (run / name).is_file(), name
    checkpoint = torch.load(run / "last.pth.tar", map_location="cpu", weights_only=False)
    assert checkpoint["arch"] == _MODEL
    model = timm.create_model(_MODEL, num_classes=10)
    model.load_state_dict(checkpoint["state_dict"])  # strict: every key of our model, nothing else


def test_timm_train_py_without_device_modules_does_not_know_the_model(train_py, digits_folder, tmp_path):
    result = _run_train_py(train_py, digits_folder, tmp_path)
    assert result.returncode != 0
    assert f"Unknown model ({_MODEL})" in result.stderr

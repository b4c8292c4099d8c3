import json
import subprocess
import sys

import pytest

from tools._train_args import parse_args, parse_validate_args
from tools.train import main as train_main
from tools.validate import main as validate_main

# batch 700 on digits' 1,437 training images = 2 optimizer steps per epoch
_FAST = ["--model", "resnet10t", "--img-size", "16", "-b", "700", "--warmup-epochs", "0", "--no-progress"]


def test_train_rejects_unknown_model():
    with pytest.raises(SystemExit):
        parse_args(["--model", "no_such_model_xyz"])


def test_train_rejects_missing_dataset_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="data-dir"):
        train_main(["--dataset", "folder", "--data-dir", str(tmp_path / "missing"), *_FAST, "--output", str(tmp_path)])


def test_train_config_rejects_unknown_keys(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("lr: 0.1\nnot_a_flag: 3\n")
    with pytest.raises(SystemExit):
        parse_args(["-c", str(config)])


def test_train_config_sets_defaults_and_flags_override(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("lr: 0.1\nepochs: 7\ndrop-path: 0.2\n")
    args = parse_args(["-c", str(config), "--epochs", "3", "--model", "resnet10t"])
    assert (args.lr, args.epochs, args.drop_path) == (0.1, 3, 0.2)


def test_train_two_steps_resume_and_validate_reload(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train_main([*_FAST, "--epochs", "1", "--output", out, "--model-ema", "--model-ema-decay", "0.5"]) == 0
    run = tmp_path / "run" / "resnet10t"
    first = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(first) == 1 and first[0]["epoch"] == 0
    assert (run / "state" / "progress.json").is_file()

    state = str(run / "state")
    assert train_main([*_FAST, "--epochs", "2", "--output", out, "--model-ema", "--resume", state]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]

    capsys.readouterr()
    assert validate_main([str(run / "last.safetensors")]) == 0
    rescored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rescored["top1"] == pytest.approx(records[-1]["top1"], abs=1e-9)
    assert rescored["val_loss"] == pytest.approx(records[-1]["val_loss"], rel=1e-5)


def test_validate_rejects_missing_checkpoint(tmp_path):
    with pytest.raises(SystemExit):
        parse_validate_args([str(tmp_path / "nope.safetensors")])


def test_train_cli_help_runs():
    result = subprocess.run([sys.executable, "tools/train.py", "--help"], capture_output=True, text=True, check=True)
    assert "--model-ema" in result.stdout and "--drop-path" in result.stdout

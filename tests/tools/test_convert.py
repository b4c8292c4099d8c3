import argparse
import sys
import types

import pytest
import timm
import torch
from safetensors.torch import load_file

import visionattn  # noqa: F401
from tests.backbones import _agent_official as agent_official
from tools.convert import main as convert_main

MODEL = "mavit_tiny"


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory):
    """A checkpoint in the official training-wrapper layout ({"model": state_dict}) with fresh random weights."""
    model = timm.create_model(MODEL)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("official") / "official.pth"
    torch.save({"model": state, "epoch": 299}, path)
    return path, state


def test_convert_writes_exact_safetensors(official_checkpoint, tmp_path, capsys):
    path, state = official_checkpoint
    out = tmp_path / "converted.safetensors"
    assert convert_main(["--model", MODEL, "--checkpoint", str(path), "--out", str(out)]) == 0
    converted = load_file(str(out))
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[k], state[k]) for k in state)
    assert '"missing": []' in capsys.readouterr().out


def test_convert_refuses_partial_loads_unless_asked(official_checkpoint, tmp_path, capsys):
    path, state = official_checkpoint
    broken = dict(state)
    broken["extra.weight"] = torch.zeros(3)
    broken.pop(next(iter(state)))
    bad = tmp_path / "bad.pth"
    torch.save(broken, bad)
    out = tmp_path / "out.safetensors"
    assert convert_main(["--model", MODEL, "--checkpoint", str(bad), "--out", str(out)]) == 1
    assert not out.exists()
    report = capsys.readouterr().out
    assert "extra.weight" in report
    assert convert_main(["--model", MODEL, "--checkpoint", str(bad), "--out", str(out), "--allow-partial"]) == 0
    assert out.exists()


def test_convert_rejects_bad_arguments(tmp_path, official_checkpoint):
    with pytest.raises(SystemExit):
        convert_main(["--model", MODEL, "--checkpoint", str(tmp_path / "missing.pth"), "--out", "x.safetensors"])
    with pytest.raises(SystemExit):
        convert_main(["--model", MODEL, "--checkpoint", str(official_checkpoint[0]), "--out", "x.bin"])


def test_convert_loads_pickles_safely(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("unsafe code ran",))

    evil = tmp_path / "evil.pth"
    torch.save({"model": Payload()}, evil)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        convert_main(["--model", MODEL, "--checkpoint", str(evil), "--out", str(tmp_path / "o.safetensors")])


def test_convert_renames_official_agent_pvt_layout(tmp_path, capsys):
    """A non-identity converter through the tool: Agent-PVT's official layout (``block1.0.attn.q``/``kv``,
    ``patch_embed1``, 5-D agent biases; see tests/backbones/_agent_official.py) written as exact safetensors."""
    rng = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=rng) for k, s in agent_official.layout("agent_pvt_tiny").items()}
    path = tmp_path / "agent_pvt_t.pth"
    torch.save({"model": state, "epoch": 299}, path)
    out = tmp_path / "agent_pvt_tiny.safetensors"
    assert convert_main(["--model", "agent_pvt_tiny", "--checkpoint", str(path), "--out", str(out)]) == 0
    assert '"missing": []' in capsys.readouterr().out
    converted = load_file(str(out))
    assert converted.keys() == timm.create_model("agent_pvt_tiny", device="meta").state_dict().keys()
    qkv = torch.cat([state["block3.1.attn.q.weight"], state["block3.1.attn.kv.weight"]])
    assert torch.equal(converted["stages.2.blocks.1.attn.qkv.weight"], qkv)
    assert torch.equal(converted["stages.0.blocks.0.attn.ah_bias"], state["block1.0.attn.ah_bias"][0, :, :, :, 0])


def _fake_yacs_cfg_node(monkeypatch):
    """A ``yacs.config.CfgNode`` lookalike (dict subclass with attribute state, as yacs pickles it) that pickles under
    yacs's name; the fake module is gone again before the checkpoint is read."""
    module = types.ModuleType("yacs.config")
    node = type("CfgNode", (dict,), {"__module__": "yacs.config"})
    module.CfgNode = node
    monkeypatch.setitem(sys.modules, "yacs", types.ModuleType("yacs"))
    monkeypatch.setitem(sys.modules, "yacs.config", module)
    config = node(MODEL=node(TYPE="agent_pvt", NUM_CLASSES=1000), TRAIN=node(EPOCHS=300))
    config.__dict__.update({"__immutable__": True, "__deprecated_keys__": set(), "__new_allowed__": False})
    return config


@pytest.mark.parametrize("codebase", ["deit", "swin"])
def test_convert_reads_official_training_checkpoints(tmp_path, monkeypatch, codebase):
    """Whole training checkpoints as the reference codebases save them: the DeiT codebase's ``args`` namespace (with
    ``model_ema``, which the converters prefer, as timm's loader does), the Swin codebase's yacs ``config``."""
    rng = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=rng) for k, s in agent_official.layout("agent_pvt_tiny").items()}
    extra = {"optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]}, "epoch": 299, "max_accuracy": 82.2}
    if codebase == "deit":
        extra |= {"model_ema": state, "args": argparse.Namespace(model="agent_pvt_tiny", lr=5e-4, output_dir="out")}
        state = {k: torch.zeros_like(v) for k, v in state.items()}  # "model": the EMA weights must win
        checkpoint = {"model": state, **extra}
    else:
        checkpoint = {"model": state, "config": _fake_yacs_cfg_node(monkeypatch), **extra}
    path = tmp_path / "official.pth"
    torch.save(checkpoint, path)
    monkeypatch.delitem(sys.modules, "yacs.config", raising=False)
    monkeypatch.delitem(sys.modules, "yacs", raising=False)
    out = tmp_path / "agent_pvt_tiny.safetensors"
    assert convert_main(["--model", "agent_pvt_tiny", "--checkpoint", str(path), "--out", str(out)]) == 0
    expected = checkpoint.get("model_ema", checkpoint["model"])
    converted = load_file(str(out))
    assert torch.equal(converted["stages.3.pos_embed"], expected["pos_embed4"])
    assert torch.equal(converted["head.weight"], expected["head.weight"])
    # timm unpickles .pth files with weights_only=True (no args / config); the converted file loads through it
    model = timm.create_model("agent_pvt_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(out)))
    assert torch.equal(model.stages[3].pos_embed, expected["pos_embed4"])

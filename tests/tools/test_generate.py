"""tools/generate.py: argument and config errors, every shipped config, a tiny end-to-end run."""

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tools.generate import _CONFIG_KEYS, apply_method, main, parse_args
from visionattn.diffusion import apply
from visionattn.diffusion._methods import _METHODS

_CONFIGS = sorted(Path(__file__).resolve().parents[2].joinpath("configs", "diffusion").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> Path:
    """A random-weight DiT pipeline (no text encoder needed) saved to a local directory."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        in_channels=4,
        out_channels=8,
        activation_fn="gelu-approximate",
        num_attention_heads=2,
        attention_head_dim=4,
        attention_bias=True,
        num_layers=1,
        norm_type="ada_norm_zero",
        num_embeds_ada_norm=1000,
        patch_size=2,
        sample_size=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(4,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=8,
    )
    path = tmp_path_factory.mktemp("tiny_dit")
    DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler()).save_pretrained(path)
    return path


def test_generate_rejects_missing_model_dir(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--model-dir", str(tmp_path / "missing")])
    assert "--model-dir" in capsys.readouterr().err


def test_generate_rejects_bad_option(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--model-dir", str(tmp_path), "--option", "kernel_size"])
    assert "KEY=VALUE" in capsys.readouterr().err


def test_generate_rejects_video_output_without_writer(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(SystemExit):
        parse_args(["--model-dir", str(tmp_path), "--output", str(tmp_path / "v.mp4")])
    assert "imageio" in capsys.readouterr().err


def test_generate_rejects_unknown_config_keys(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("method: local\nkernel: 3\n")
    with pytest.raises(SystemExit):
        parse_args(["--model-dir", str(tmp_path), "-c", str(config)])
    assert "kernel" in capsys.readouterr().err


def test_generate_command_line_overrides_config(tmp_path):
    config = tmp_path / "local.yaml"
    config.write_text("method: local\noptions: {kernel_size: 5}\ncall: {num_inference_steps: 20}\n")
    args = parse_args(["--model-dir", str(tmp_path), "-c", str(config), "--option", "stride=2", "--steps", "4"])
    assert args.settings["options"] == {"kernel_size": 5, "stride": 2}
    assert args.settings["call"]["num_inference_steps"] == 4
    args = parse_args(["--model-dir", str(tmp_path), "-c", str(config), "--method", "linear"])
    assert args.settings["method"] == "linear" and args.settings["options"] == {}


@pytest.mark.parametrize("config", _CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_are_valid(config):
    settings = yaml.safe_load(config.read_text())
    assert set(settings) <= set(_CONFIG_KEYS)
    method = _METHODS[settings["method"]]
    assert "method_weights" not in settings, "shipped configs must not point to weights that are not shipped"
    options = dict(settings.get("options") or {})
    if "head_dim" in method.__init__.__code__.co_varnames:
        options["head_dim"] = 64
    method(**options)


def test_generate_runs_a_tiny_pipeline(tiny_pipeline, tmp_path, capsys):
    output = tmp_path / "out.png"
    argv = ["--model-dir", str(tiny_pipeline), "--method", "local", "--option", "kernel_size=3"]
    argv += ["--option", "backend=reference", "--prompt", "3", "--steps", "2", "--height", "64", "--no-progress"]
    assert main([*argv, "--output", str(output)]) == 0
    assert output.is_file()
    printed = capsys.readouterr()
    assert "attention density=0.5625" in printed.out and "time=" in printed.out
    assert "['height']" in printed.err, "call arguments the pipeline does not take are reported"


def _trained_weights(pipeline_dir: Path, path: Path):
    """A tiny DiT transformer after apply('linear') with random method tensors saved to ``path``."""
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel.from_pretrained(pipeline_dir / "transformer", local_files_only=True).eval()
    handle = apply(model, "linear", backend="reference")
    with torch.no_grad():
        for value in handle.method_state_dict().values():
            value.normal_(generator=torch.Generator().manual_seed(0))
    save_file(handle.method_state_dict(), str(path))
    return model


def test_generate_loads_method_weights(tiny_pipeline, tmp_path):
    from diffusers import DiffusionPipeline

    weights = tmp_path / "linear.safetensors"
    trained = _trained_weights(tiny_pipeline, weights)
    config = tmp_path / "dit_linear.yaml"
    config.write_text(f"method: linear\noptions: {{backend: reference}}\nmethod_weights: {weights}\n")
    args = parse_args(["--model-dir", str(tiny_pipeline), "-c", str(config)])
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline, local_files_only=True)
    handle = apply_method(pipe, args.settings)
    inputs = dict(
        hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([500, 20]), class_labels=torch.tensor([1, 7])
    )
    with torch.no_grad():
        want = trained(**inputs, return_dict=False)[0]
        assert torch.equal(pipe.transformer(**inputs, return_dict=False)[0], want)
    assert handle.method_state_dict().keys() == load_file(str(weights)).keys()

    argv = ["--model-dir", str(tiny_pipeline), "--method", "linear", "--option", "backend=reference"]
    argv += ["--method-weights", str(weights), "--prompt", "3", "--steps", "2", "--no-progress"]
    assert main([*argv, "--output", str(tmp_path / "out.png")]) == 0
    with pytest.raises(ValueError, match="missing and .* unexpected"):
        main([*argv[:3], "sparse_linear", *argv[4:], "--output", str(tmp_path / "bad.png")])


def test_generate_rejects_bad_method_weights(tmp_path, capsys):
    base = ["--model-dir", str(tmp_path), "--method", "linear"]
    with pytest.raises(SystemExit):
        parse_args([*base, "--method-weights", str(tmp_path / "missing.safetensors")])
    assert "--method-weights" in capsys.readouterr().err
    weights = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(1)}, str(weights))
    with pytest.raises(SystemExit):
        parse_args(["--model-dir", str(tmp_path), "--method-weights", str(weights)])
    assert "dense" in capsys.readouterr().err

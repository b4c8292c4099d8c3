"""Generate an image or video with a local diffusers pipeline whose self-attention runs a visionattn method.

    python tools/generate.py --model-dir /models/Wan2.1-T2V-1.3B-Diffusers -c configs/diffusion/wan_radial.yaml \\
        --prompt "a corgi surfing" --height 480 --width 832 --num-frames 81 --output corgi.mp4

A config (``configs/diffusion/<model>_<method>.yaml``) holds ``method``, ``options`` (the method's options),
``dense_layers``, ``dense_steps``, ``method_weights`` and ``call`` (pipeline call arguments such as
``num_inference_steps``); command-line flags override it (``--method dense`` runs the stock attention, for
comparisons). ``method_weights`` (``--method-weights``) is a safetensors file of the method's fine-tuned tensors
(SLA's ``proj``, LinFusion's projections), saved with ``save_file(handle.method_state_dict(), path)`` after
``apply`` with the same method and options; it is loaded after ``apply`` with a strict key check. The pipeline's own
progress bar shows the denoising steps; at the end the script prints the wall time and the mean attention density.
"""

import argparse
import importlib.util
import inspect
import sys
import time
from pathlib import Path

import torch
import yaml

_CONFIG_KEYS = ("method", "options", "dense_layers", "dense_steps", "method_weights", "call")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _parse_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--option must look like KEY=VALUE; got {text!r}.")
    return key, yaml.safe_load(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True, type=Path, help="local diffusers pipeline directory")
    parser.add_argument("-c", "--config", type=Path, help="YAML with method, options, dense_layers, dense_steps, call")
    parser.add_argument("--method", help="local, radial, sparse_linear, linear, agent, or dense (stock attention)")
    parser.add_argument("--option", action="append", default=[], type=_parse_option, help="method option KEY=VALUE")
    parser.add_argument(
        "--method-weights",
        type=Path,
        help="safetensors of the method's fine-tuned tensors (handle.method_state_dict())",
    )
    parser.add_argument("--prompt", default="", help="text prompt (class-conditional pipelines: a label or id)")
    parser.add_argument("--negative-prompt")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--num-frames", type=int)
    parser.add_argument("--steps", type=int, help="num_inference_steps")
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16" if torch.cuda.is_available() else "fp32")
    parser.add_argument("--output", type=Path, default=Path("output.png"), help=".png for images, .mp4 or a folder")
    parser.add_argument("--fps", type=int, default=16, help="frames per second of an .mp4 output (Wan: 16, LTX: 24)")
    parser.add_argument("--no-progress", action="store_true", help="hide the pipeline's progress bar")
    args = parser.parse_args(argv)
    if not args.model_dir.is_dir():
        parser.error(f"--model-dir must be an existing directory; got {str(args.model_dir)!r}.")
    if args.output.suffix == ".mp4" and not any(importlib.util.find_spec(m) for m in ("imageio", "cv2")):
        # checked before generating, so a long run is not lost at the end
        parser.error(
            "--output *.mp4 needs imageio: pip install imageio imageio-ffmpeg (or give a folder for PNG frames)."
        )
    args.settings = _settings(parser, args)
    return args


def _settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """The config file merged with the command line (the command line wins)."""
    settings = {
        "method": "dense",
        "options": {},
        "dense_layers": None,
        "dense_steps": None,
        "method_weights": None,
        "call": {},
    }
    config_method = None
    if args.config is not None:
        if not args.config.is_file():
            parser.error(f"--config must be an existing YAML file; got {str(args.config)!r}.")
        loaded = yaml.safe_load(args.config.read_text()) or {}
        unknown = sorted(set(loaded) - set(_CONFIG_KEYS))
        if unknown:
            parser.error(f"config keys must be among {_CONFIG_KEYS}; got unknown keys {unknown} in {args.config}.")
        settings.update({k: v for k, v in loaded.items() if v is not None})
        config_method = settings["method"]
    if args.method is not None and args.method != config_method:
        # the config's options and weights belong to its own method
        settings.update(method=args.method, options={}, dense_layers=None, dense_steps=None, method_weights=None)
    settings["options"] = dict(settings["options"], **dict(args.option))
    if args.method_weights is not None:
        settings["method_weights"] = args.method_weights
    weights = settings["method_weights"]
    if weights is not None:
        if settings["method"] == "dense":
            parser.error("--method-weights needs a method other than dense; got method='dense'.")
        if not Path(weights).is_file():
            parser.error(
                f"--method-weights (method_weights) must be an existing safetensors file; got {str(weights)!r}."
            )
    flags = {
        "negative_prompt": args.negative_prompt,
        "height": args.height,
        "width": args.width,
        "num_frames": args.num_frames,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
    }
    settings["call"] = dict(settings["call"], **{k: v for k, v in flags.items() if v is not None})
    return settings


def _call_kwargs(pipe, args: argparse.Namespace) -> dict:
    """Pipeline call arguments, keeping only those its ``__call__`` accepts."""
    accepted = inspect.signature(pipe.__call__).parameters
    kwargs = {k: v for k, v in args.settings["call"].items() if k in accepted}
    ignored = sorted(set(args.settings["call"]) - set(kwargs))
    if ignored:
        print(f"{type(pipe).__name__} takes no {ignored}; ignoring them.", file=sys.stderr)
    if "prompt" in accepted:
        kwargs["prompt"] = args.prompt
    elif "class_labels" in accepted:
        label = args.prompt or "0"
        kwargs["class_labels"] = [int(label)] if label.isdigit() else pipe.get_label_ids([label])
    kwargs["generator"] = torch.Generator(device="cpu").manual_seed(args.seed)
    return kwargs


def apply_method(pipe, settings: dict):
    """``apply`` the configured method to ``pipe`` and load its fine-tuned tensors; ``None`` for dense."""
    from safetensors.torch import load_file

    from visionattn.diffusion import apply

    if settings["method"] == "dense":
        return None
    handle = apply(
        pipe,
        settings["method"],
        dense_layers=settings["dense_layers"],
        dense_steps=settings["dense_steps"],
        **settings["options"],
    )
    if settings["method_weights"] is not None:
        handle.load_method_state_dict(load_file(str(settings["method_weights"])))
    return handle


def _save(result, path: Path, fps: int) -> Path:
    if getattr(result, "frames", None) is not None:
        frames = result.frames[0]
        if path.suffix == ".mp4":
            from diffusers.utils import export_to_video

            export_to_video(frames, str(path), fps=fps)
            return path
        path.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        for i, frame in enumerate(frames):
            image = frame if isinstance(frame, Image.Image) else Image.fromarray((frame * 255).round().astype("uint8"))
            image.save(path / f"{i:04d}.png")
        return path
    result.images[0].save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    from diffusers import DiffusionPipeline

    from visionattn.diffusion import remove

    args = parse_args(argv)
    settings = args.settings
    pipe = DiffusionPipeline.from_pretrained(args.model_dir, dtype=_DTYPES[args.dtype], local_files_only=True)
    pipe.to(args.device)
    pipe.set_progress_bar_config(disable=args.no_progress)
    handle = apply_method(pipe, settings)
    kwargs = _call_kwargs(pipe, args)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = pipe(**kwargs)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    density = handle.density() if handle is not None else 1.0
    saved = _save(result, args.output, args.fps)
    print(f"method={settings['method']} time={seconds:.2f}s", end=" ")
    print(f"attention density={density:.4f}" if density is not None else "attention density=n/a (linear)", end=" ")
    print(f"output={saved}")
    if handle is not None:
        remove(handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command-line and YAML arguments of ``tools/train.py`` and ``tools/validate.py``, named as in timm's train.py."""

import argparse
import ast
import pathlib

import yaml

__all__ = ["parse_args", "parse_validate_args"]


def _model_kwargs(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--model-kwargs entries must be key=value; got {text!r}.")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _as_model_kwargs(value) -> dict:
    """``--model-kwargs`` from the command line (parsed pairs), or from YAML (a mapping or ``key=value`` strings)."""
    if isinstance(value, dict):
        return dict(value)
    return dict(_model_kwargs(v) if isinstance(v, str) else v for v in value)


def _add_model_and_data(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and data")
    group.add_argument("--model", default="mavit_tiny", help="timm model name (visionattn models are registered)")
    group.add_argument("--model-kwargs", nargs="*", default=[], type=_model_kwargs, help="extra key=value model args")
    group.add_argument("--num-classes", type=int, default=None, help="default: classes found in the dataset")
    group.add_argument("--pretrained", action="store_true", help="load the model's pretrained cfg weights")
    group.add_argument("--initial-checkpoint", default="", help="weights (.safetensors/.pth) to start from")
    group.add_argument(
        "--dataset", default=None, help="'digits' (embedded) or 'folder' (ImageFolder); default: folder if --data-dir"
    )
    group.add_argument("--data-dir", default=None, help="root with train/ and val/ class folders")
    group.add_argument("--img-size", type=int, default=None, help="input image size (default: the model's cfg)")
    group.add_argument("--input-size", type=int, nargs=3, default=None, help="C H W input size")
    group.add_argument("--crop-pct", type=float, default=None)
    group.add_argument("--mean", type=float, nargs=3, default=None)
    group.add_argument("--std", type=float, nargs=3, default=None)
    group.add_argument("--interpolation", default="")
    group.add_argument("-b", "--batch-size", type=int, default=128)
    group.add_argument("-vb", "--validation-batch-size", type=int, default=None)
    group.add_argument("-j", "--workers", type=int, default=0)
    group.add_argument("--amp", action="store_true", help="mixed precision (bf16 by default)")
    group.add_argument("--amp-dtype", default="bfloat16", choices=("bfloat16", "float16"))
    group.add_argument("--cpu", action="store_true", help="force CPU even where a GPU exists")
    group.add_argument("--seed", type=int, default=42)


def _build_train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train an image classifier with timm pieces and accelerate.")
    parser.add_argument("-c", "--config", default="", help="YAML file of flag defaults (timm train.py style)")
    _add_model_and_data(parser)
    opt = parser.add_argument_group("optimizer and schedule")
    opt.add_argument("--opt", default="adamw")
    opt.add_argument("--lr", type=float, default=1e-3)
    opt.add_argument("--weight-decay", type=float, default=0.05)
    opt.add_argument("--momentum", type=float, default=0.9)
    opt.add_argument("--clip-grad", type=float, default=None)
    opt.add_argument("--sched", default="cosine")
    opt.add_argument("--epochs", type=int, default=300)
    opt.add_argument("--decay-epochs", type=float, default=90)
    opt.add_argument("--decay-rate", type=float, default=0.1)
    opt.add_argument("--warmup-epochs", type=int, default=5)
    opt.add_argument("--warmup-lr", type=float, default=1e-6)
    opt.add_argument("--min-lr", type=float, default=1e-5)
    opt.add_argument("--cooldown-epochs", type=int, default=0)
    opt.add_argument("--grad-accum-steps", type=int, default=1)
    reg = parser.add_argument_group("augmentation and regularisation")
    reg.add_argument("--aa", default=None, help="AutoAugment policy, e.g. rand-m9-mstd0.5-inc1")
    reg.add_argument("--reprob", type=float, default=0.0)
    reg.add_argument("--color-jitter", type=float, default=0.4)
    reg.add_argument("--mixup", type=float, default=0.0)
    reg.add_argument("--cutmix", type=float, default=0.0)
    reg.add_argument("--mixup-prob", type=float, default=1.0)
    reg.add_argument("--mixup-switch-prob", type=float, default=0.5)
    reg.add_argument("--smoothing", type=float, default=0.1)
    reg.add_argument("--drop", type=float, default=0.0)
    reg.add_argument("--drop-path", type=float, default=None)
    reg.add_argument("--model-ema", action="store_true")
    reg.add_argument("--model-ema-decay", type=float, default=0.9998)
    out = parser.add_argument_group("output")
    out.add_argument("--output", default="output/train")
    out.add_argument("--experiment", default="", help="sub-folder name (default: the model name)")
    out.add_argument("--resume", default="", help="state/ folder of an earlier run to continue")
    out.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    return parser


def _apply_config(parser: argparse.ArgumentParser, path: str) -> None:
    file = pathlib.Path(path)
    if not file.is_file():
        parser.error(f"-c/--config file {path} does not exist.")
    config = yaml.safe_load(file.read_text()) or {}
    known = {a.dest for a in parser._actions}
    normalised = {k.replace("-", "_"): v for k, v in config.items()}
    unknown = sorted(set(normalised) - known)
    if unknown:
        parser.error(f"-c/--config {path} has unknown keys {unknown}.")
    parser.set_defaults(**normalised)


def parse_args(argv=None) -> argparse.Namespace:
    """Parse train.py arguments: ``-c`` YAML first (as defaults), then the command line."""
    parser = _build_train_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        _apply_config(parser, pre.config)
    args = parser.parse_args(argv)
    args.dataset = args.dataset or ("folder" if args.data_dir else "digits")
    if args.dataset not in ("digits", "folder"):
        parser.error(f"--dataset must be 'digits' or 'folder'; got {args.dataset!r}.")
    if args.dataset == "folder" and not args.data_dir:
        parser.error("--data-dir is required with --dataset folder.")
    import timm

    import visionattn  # noqa: F401  (registers the visionattn models)

    if args.model not in timm.list_models():
        close = timm.list_models(f"*{args.model.split('_')[0]}*")[:8]
        parser.error(f"--model {args.model!r} is not a registered timm model; similar names: {close}.")
    args.model_kwargs = _as_model_kwargs(args.model_kwargs)
    args.experiment = args.experiment or args.model
    return args


def parse_validate_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Evaluate a checkpoint written by tools/train.py.")
    parser.add_argument("checkpoint", help="model weights (.safetensors from train.py, or .pth)")
    _add_model_and_data(parser)
    parser.set_defaults(model=None)
    args = parser.parse_args(argv)
    args.dataset = args.dataset or ("folder" if args.data_dir else "digits")
    if not pathlib.Path(args.checkpoint).is_file():
        parser.error(f"checkpoint {args.checkpoint} does not exist.")
    args.model_kwargs = _as_model_kwargs(args.model_kwargs)
    return args

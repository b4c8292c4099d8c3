"""Evaluate a checkpoint written by ``tools/train.py`` (or any timm-loadable weights) and print JSON metrics.

    python tools/validate.py output/train/mavit_tiny/model_best.safetensors            # model/classes from metadata
    python tools/validate.py weights.pth --model ravlt_tiny --dataset folder --data-dir /data/imagenet

Weights load safely: safetensors, or ``torch.load(weights_only=True)`` for .pth/.pt files.
"""

import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from tools._train_args import parse_validate_args  # noqa: E402


def load_weights(path: str) -> tuple[dict, dict]:
    """``(state_dict, metadata)`` from a .safetensors file or a .pth/.pt file (``weights_only=True``)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            return state[key], {}
    return state, {}


def main(argv=None) -> int:
    args = parse_validate_args(argv)
    import timm
    from accelerate import Accelerator

    import visionattn  # noqa: F401
    from tools._data import build_loaders, count_classes
    from tools.train import _evaluate

    state, meta = load_weights(args.checkpoint)
    args.model = args.model or meta.get("model")
    if not args.model:
        raise SystemExit("validate.py: --model is required (the checkpoint has no 'model' metadata).")
    if args.img_size is None and meta.get("img_size", "None") != "None":
        args.img_size = int(meta["img_size"])
    if not args.model_kwargs and meta.get("model_kwargs"):
        args.model_kwargs = json.loads(meta["model_kwargs"])
    num_classes = args.num_classes or int(meta.get("num_classes", 0)) or count_classes(args)
    model = timm.create_model(args.model, num_classes=num_classes, **args.model_kwargs)
    model.load_state_dict(state, strict=True)
    mixed = {"bfloat16": "bf16", "float16": "fp16"}[args.amp_dtype] if args.amp else "no"
    accelerator = Accelerator(mixed_precision=mixed, cpu=args.cpu)
    _, val_loader, _ = build_loaders(args, model, train=False)
    model, val_loader = accelerator.prepare(model, val_loader)
    metrics = {"model": args.model, "checkpoint": args.checkpoint, **_evaluate(model, val_loader, accelerator)}
    if accelerator.is_main_process:
        print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())

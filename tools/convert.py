"""Convert an official checkpoint (.pth/.pt/.safetensors) into a visionattn model's safetensors weights.

    python tools/convert.py --model biformer_tiny --checkpoint biformer_tiny_best.pth --out biformer_tiny.safetensors

The model family's ``checkpoint_filter_fn`` (the one timm uses for ``pretrained=True``) renames the official keys;
the tool then loads them into a freshly built model, prints a report of matched / missing / unexpected keys and
shape mismatches, and writes the converted weights only when the load is exact (or ``--allow-partial``).
Untrusted files are read safely: safetensors, or ``torch.load(weights_only=True)``. The official releases may be whole
training checkpoints, which pickle the run's configuration beside the weights: the DeiT codebase (MAViT, RAVLT,
BiFormer, Agent-DeiT) its ``argparse.Namespace`` as ``args``, the Swin codebase (Agent-Swin, Agent-PVT) its yacs
``CfgNode`` as ``config``. ``weights_only`` rejects both; they are allowed here as inert containers (no yacs code runs).
"""

import argparse
import collections
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from tools.validate import load_weights  # noqa: E402

#: Configuration objects of the official training checkpoints, loadable under ``weights_only=True`` (see above).
#: The weights-only unpickler fills only ``dict``, ``OrderedDict`` or ``Counter`` items and sets attribute state only
#: on allowlisted classes, so yacs's ``CfgNode`` (a ``dict`` subclass with attribute state) loads as a ``Counter``.
CHECKPOINT_CONFIG_GLOBALS = [argparse.Namespace, (collections.Counter, "yacs.config.CfgNode")]


def _filter_fn(model):
    module = sys.modules[type(model).__module__]
    fn = getattr(module, "checkpoint_filter_fn", None)
    if fn is None:
        raise SystemExit(f"convert.py: {type(model).__module__} has no checkpoint_filter_fn; nothing to convert with.")
    return fn


def convert(model_name: str, checkpoint: str, num_classes: int | None = None) -> tuple[dict, dict]:
    """``(converted_state_dict, report)`` for ``checkpoint`` loaded into ``model_name``."""
    import timm

    import visionattn  # noqa: F401

    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    model = timm.create_model(model_name, pretrained=False, **kwargs)
    with torch.serialization.safe_globals(CHECKPOINT_CONFIG_GLOBALS):
        official, _ = load_weights(checkpoint)
    converted = _filter_fn(model)(official, model)
    expected = model.state_dict()
    mismatched = sorted(
        k for k in converted.keys() & expected.keys() if tuple(converted[k].shape) != tuple(expected[k].shape)
    )
    report = {
        "official_keys": len(official),
        "matched": len(converted.keys() & expected.keys()) - len(mismatched),
        "missing": sorted(expected.keys() - converted.keys()),
        "unexpected": sorted(converted.keys() - expected.keys()),
        "shape_mismatch": [f"{k}: {tuple(converted[k].shape)} vs {tuple(expected[k].shape)}" for k in mismatched],
    }
    return converted, report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="visionattn model name, e.g. mavit_tiny")
    parser.add_argument("--checkpoint", required=True, help="official .pth/.pt/.safetensors file")
    parser.add_argument("--out", required=True, help="output .safetensors path")
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--allow-partial", action="store_true", help="write even with missing/unexpected keys")
    args = parser.parse_args(argv)
    if not pathlib.Path(args.checkpoint).is_file():
        parser.error(f"--checkpoint {args.checkpoint} does not exist.")
    if not args.out.endswith(".safetensors"):
        parser.error(f"--out must end with .safetensors; got {args.out!r}.")
    converted, report = convert(args.model, args.checkpoint, args.num_classes)
    print(json.dumps({k: v if isinstance(v, int) else v[:20] for k, v in report.items()}, indent=1))
    exact = not (report["missing"] or report["unexpected"] or report["shape_mismatch"])
    if not exact and not args.allow_partial:
        print("convert.py: not written: the checkpoint does not match the model exactly (see report).")
        return 1
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in converted.items() if isinstance(v, torch.Tensor)}
    save_file(tensors, args.out, metadata={"model": args.model, "source": pathlib.Path(args.checkpoint).name})
    print(f"wrote {args.out} ({len(tensors)} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

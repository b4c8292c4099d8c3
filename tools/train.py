"""Image-classification training for visionattn (and any timm) models, on one GPU, several, or CPU.

Built from timm's library pieces (model factory, transforms, Mixup/CutMix, ``create_optimizer_v2``,
``create_scheduler_v2``, ``ModelEmaV3``) and ``accelerate`` for devices, mixed precision and distribution:

    python tools/train.py --dataset digits --model mavit_tiny --img-size 32 --epochs 3      # CPU quickstart
    accelerate launch tools/train.py -c configs/train/mavit_tiny.yaml --data-dir /data/imagenet
    torchrun --nproc-per-node 8 tools/train.py -c configs/train/ravlt_small.yaml --data-dir /data/imagenet

Flag names follow timm's ``train.py`` (``--model``, ``--lr``, ``--epochs``, ``-b/--batch-size``, ``--drop-path``,
``--model-ema``, ``--mixup``, ...); ``-c`` loads a YAML file whose keys are those flags' names (dashes or
underscores), and explicit flags override it. Outputs in ``--output/<experiment>``: ``metrics.jsonl`` (one JSON object
per epoch), ``model_best.safetensors`` / ``last.safetensors`` (weights; the EMA weights when ``--model-ema``) with
``args.yaml``, and ``state/`` (accelerate's resumable state: optimizer, scheduler, RNG, EMA).
"""

import json
import math
import os
import pathlib
import sys
import time

import torch
import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from tools._train_args import parse_args  # noqa: E402


def _evaluate(model, loader, accelerator) -> dict:
    """Top-1/top-5 accuracy and mean cross-entropy over ``loader`` (gathered across processes)."""
    model.eval()
    loss_sum, correct1, correct5, count = 0.0, 0, 0, 0
    with torch.no_grad():
        for images, targets in loader:
            with accelerator.autocast():
                logits = model(images)
            logits, targets = accelerator.gather_for_metrics((logits.float(), targets))
            loss_sum += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            correct1 += int((top[:, 0] == targets).sum())
            correct5 += int((top == targets[:, None]).any(-1).sum())
            count += len(targets)
    return {"val_loss": loss_sum / count, "top1": 100.0 * correct1 / count, "top5": 100.0 * correct5 / count}


def _save_weights(model, path: pathlib.Path, accelerator, metadata: dict) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    save_file(state, str(path), metadata={k: str(v) for k, v in metadata.items()})


def main(argv=None) -> int:
    args = parse_args(argv)
    import timm
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3
    from tqdm import tqdm

    import visionattn  # noqa: F401  (registers the visionattn models with timm)
    from tools._data import build_loaders, count_classes

    mixed = {"bfloat16": "bf16", "float16": "fp16"}[args.amp_dtype] if args.amp else "no"
    accelerator = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=args.grad_accum_steps, cpu=args.cpu)
    set_seed(args.seed, device_specific=True)

    num_classes = args.num_classes or count_classes(args)
    model = timm.create_model(
        args.model,
        pretrained=args.pretrained,
        num_classes=num_classes,
        drop_rate=args.drop,
        drop_path_rate=args.drop_path,
        **args.model_kwargs,
    )
    if args.initial_checkpoint:
        from timm.models import load_checkpoint

        load_checkpoint(model, args.initial_checkpoint, strict=True)
    train_loader, val_loader, _ = build_loaders(args, model)

    optimizer = create_optimizer_v2(
        model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum
    )
    updates_per_epoch = math.ceil(len(train_loader) / args.grad_accum_steps / accelerator.num_processes)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer,
        sched=args.sched,
        num_epochs=args.epochs,
        decay_epochs=args.decay_epochs,
        decay_rate=args.decay_rate,
        min_lr=args.min_lr,
        warmup_lr=args.warmup_lr,
        warmup_epochs=args.warmup_epochs,
        cooldown_epochs=args.cooldown_epochs,
        updates_per_epoch=updates_per_epoch,
    )
    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=args.mixup,
            cutmix_alpha=args.cutmix,
            prob=args.mixup_prob,
            switch_prob=args.mixup_switch_prob,
            label_smoothing=args.smoothing,
            num_classes=num_classes,
        )
        train_loss_fn = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        train_loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train_loss_fn = torch.nn.CrossEntropyLoss()

    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    accelerator.register_for_checkpointing(scheduler)
    ema = ModelEmaV3(accelerator.unwrap_model(model), decay=args.model_ema_decay) if args.model_ema else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    out_dir = pathlib.Path(args.output) / args.experiment
    start_epoch, best_top1 = 0, -1.0
    if args.resume:
        resume_dir = pathlib.Path(args.resume)
        if not (resume_dir / "progress.json").is_file():
            raise FileNotFoundError(f"--resume must point at a state/ folder written by train.py; got {resume_dir}.")
        accelerator.load_state(str(resume_dir))
        progress = json.loads((resume_dir / "progress.json").read_text())
        start_epoch, best_top1 = progress["next_epoch"], progress["best_top1"]
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "args.yaml").write_text(yaml.safe_dump(vars(args), sort_keys=True))

    eval_model = lambda: ema.module if ema is not None else model
    for epoch in range(start_epoch, num_epochs):
        model.train()
        t0, seen, loss_sum, steps, batches = time.perf_counter(), 0, 0.0, 0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch}", disable=not accelerator.is_main_process or args.no_progress)
        for images, targets in bar:
            if mixup is not None:
                images, targets = mixup(images, targets)
            with accelerator.accumulate(model), accelerator.autocast():
                loss = train_loss_fn(model(images), targets)
                accelerator.backward(loss)
                if args.clip_grad and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                steps += 1
                scheduler.step_update(num_updates=epoch * updates_per_epoch + steps)
                if ema is not None:
                    ema.update(accelerator.unwrap_model(model), step=epoch * updates_per_epoch + steps)
            seen += len(images) * accelerator.num_processes
            loss_sum, batches = loss_sum + float(loss.detach()), batches + 1
            bar.set_postfix(loss=f"{loss_sum / batches:.3f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        scheduler.step(epoch + 1)
        metrics = _evaluate(eval_model(), val_loader, accelerator)
        record = {
            "epoch": epoch,
            "train_loss": loss_sum / max(1, batches),
            "lr": optimizer.param_groups[0]["lr"],
            "train_images_per_s": seen / (time.perf_counter() - t0),
            **metrics,
        }
        if accelerator.is_main_process:
            with (out_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
            meta = {"model": args.model, "num_classes": num_classes, "img_size": args.img_size, "epoch": epoch}
            meta.update(top1=metrics["top1"], model_kwargs=json.dumps(args.model_kwargs))
            _save_weights(eval_model(), out_dir / "last.safetensors", accelerator, meta)
            if metrics["top1"] > best_top1:
                best_top1 = metrics["top1"]
                _save_weights(eval_model(), out_dir / "model_best.safetensors", accelerator, meta)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(out_dir / "state"), safe_serialization=True)
        if accelerator.is_main_process:
            progress = {"next_epoch": epoch + 1, "best_top1": best_top1}
            (out_dir / "state" / "progress.json").write_text(json.dumps(progress))
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

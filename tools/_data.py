"""Datasets and loaders shared by ``tools/train.py`` and ``tools/validate.py``.

Two sources: an ImageFolder tree (``<data-dir>/train/<class>/*.jpg`` and ``<data-dir>/val/<class>/*``, timm's layout)
and the embedded default ``digits``: scikit-learn's 8x8 handwritten digits (1,797 images shipped inside the package,
no download), upsampled to the model's input size and repeated to 3 channels, split 80/20 with a fixed seed.
"""

import pathlib

import torch
from timm.data import create_transform, resolve_data_config
from torch.utils.data import DataLoader, Dataset

__all__ = ["DIGITS", "build_loaders", "count_classes"]

#: Name of the embedded dataset.
DIGITS = "digits"
_DIGITS_VAL_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0


class _DigitsDataset(Dataset):
    """scikit-learn's digits as ``(3, S, S)`` float images in [0, 1] (bilinear upsampling), with integer labels."""

    def __init__(self, split: str, image_size: int, mean, std, augment: bool):
        from sklearn.datasets import load_digits

        data = load_digits()
        images = torch.tensor(data.images, dtype=torch.float32) / 16.0
        labels = torch.tensor(data.target, dtype=torch.long)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(_DIGITS_SPLIT_SEED))
        n_val = int(len(labels) * _DIGITS_VAL_FRACTION)
        index = order[n_val:] if split == "train" else order[:n_val]
        images = torch.nn.functional.interpolate(
            images[index, None], size=(image_size, image_size), mode="bilinear", align_corners=False
        )
        self.images = (images.expand(-1, 3, -1, -1) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
            1, 3, 1, 1
        )
        self.labels = labels[index]
        self.augment = augment
        self.num_classes = 10

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        image = self.images[i]
        if self.augment:
            # small random translation (digits are centred; flips would change the class)
            shift = torch.randint(-2, 3, (2,)).tolist()
            image = torch.roll(image, shifts=shift, dims=(1, 2))
        return image, self.labels[i]


def _image_folder(root: pathlib.Path, split: str, transform):
    from torchvision.datasets import ImageFolder

    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(
            f"--data-dir must contain a '{split}' folder of class sub-folders (ImageFolder layout); "
            f"{folder} does not exist. Use --dataset digits for the embedded dataset."
        )
    return ImageFolder(str(folder), transform=transform)


def count_classes(args) -> int:
    """Classes of the dataset: 10 for digits, the sub-folders of ``<data-dir>/train`` for an ImageFolder tree."""
    if args.dataset == DIGITS:
        return 10
    if not args.data_dir:
        raise ValueError("--data-dir is required unless --dataset digits is used.")
    folder = pathlib.Path(args.data_dir) / "train"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"--data-dir must contain a 'train' folder of class sub-folders (ImageFolder layout); "
            f"{folder} does not exist. Use --dataset digits for the embedded dataset."
        )
    return sum(1 for p in folder.iterdir() if p.is_dir())


def build_loaders(args, model, *, train: bool = True) -> tuple[DataLoader | None, DataLoader, int]:
    """``(train_loader, val_loader, num_classes)`` for ``args.dataset`` / ``args.data_dir``.

    Image size, mean, std and crop come from the model's pretrained cfg via timm's ``resolve_data_config``,
    overridden by ``--img-size``/``--mean``/``--std`` like timm's train.py.
    """
    data_config = resolve_data_config(vars(args), model=model, verbose=False)
    size = data_config["input_size"][-1]
    if args.dataset == DIGITS:
        make = lambda split, augment: _DigitsDataset(split, size, data_config["mean"], data_config["std"], augment)
        train_set = make("train", True) if train else None
        val_set = make("val", False)
        num_classes = val_set.num_classes
    else:
        if not args.data_dir:
            raise ValueError("--data-dir is required unless --dataset digits is used.")
        root = pathlib.Path(args.data_dir)
        train_tf = create_transform(
            **data_config,
            is_training=True,
            auto_augment=args.aa,
            re_prob=args.reprob,
            color_jitter=args.color_jitter,
        )
        eval_tf = create_transform(**data_config, is_training=False)
        train_set = _image_folder(root, "train", train_tf) if train else None
        val_set = _image_folder(root, "val", eval_tf)
        num_classes = len(val_set.classes)
    loader = lambda ds, shuffle, batch: DataLoader(
        ds,
        batch_size=batch,
        shuffle=shuffle,
        num_workers=args.workers,
        drop_last=shuffle,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(args.seed) if shuffle else None,
    )
    train_loader = loader(train_set, True, args.batch_size) if train_set is not None else None
    val_loader = loader(val_set, False, args.validation_batch_size or args.batch_size)
    return train_loader, val_loader, num_classes

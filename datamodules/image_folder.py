"""Any folder of images (flat, or in class sub-folders), resized and centre-cropped to a square."""

from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from datamodules.base import ImageDataModule, UInt8Images


def list_images(root: str | Path) -> list[Path]:
    """Image files under ``root`` at any depth, sorted, by torchvision's list of extensions."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {str(root)!r}")
    return files


class ImageFiles(Dataset):
    """Images read from disk as uint8 (C, H, W) tensors in ``mode`` ("L" or "RGB") after ``transform``."""

    def __init__(self, files: list[Path], mode: str, transform):
        self.files, self.mode, self.transform = files, mode, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tensor:
        try:
            with Image.open(self.files[i]) as img:
                return self.transform(img.convert(self.mode))
        except OSError as err:  # PIL's "image file is truncated" names no file
            raise ValueError(f"cannot read image {self.files[i]}: {err}") from err


def class_folders(root: str | Path, files: list[Path]) -> list[str] | None:
    """The first-level sub-folder of ``root`` that holds each file (its class, as torchvision's ImageFolder), or
    None when any image lies in ``root`` itself (unlabelled data)."""
    parts = [f.relative_to(root).parts for f in files]
    return None if any(len(p) < 2 for p in parts) else [p[0] for p in parts]


class ImageFolderDataModule(ImageDataModule):
    """Images under ``data_dir``, scaled to [-1, 1]; labelled by class sub-folder when every image is in one."""

    def __init__(
        self,
        data_dir: str,
        image_size: int = 32,
        channels: int = 3,
        batch_size: int = 128,
        num_workers: int = 2,
        download: bool = False,
        val_fraction: float = 0.02,
        random_flip: bool = False,
        test_dir: str | None = None,
        predict_num_samples: int = 10000,
    ):
        """
        Args:
            data_dir: folder of images, searched recursively. When every image lies in a sub-folder, each first-level
                sub-folder is a class (sorted names, label i is ``classes[i]``) and batches carry labels.
            image_size: images are resized (shorter side) and centre-cropped to this square side.
            channels: 1 reads images as greyscale, 3 as RGB.
            batch_size: images per batch on each device (the global batch is this × devices × nodes).
            num_workers: DataLoader worker processes decoding images.
            download: accepted for a uniform CLI; a local folder has nothing to download.
            val_fraction: share of the images held out for validation.
            random_flip: random horizontal flips of training images.
            test_dir: folder of reference images for ``test``; None reuses the validation images.
            predict_num_samples: images that ``cm-lightning predict`` generates.
        """
        super().__init__(data_dir, batch_size, num_workers, download, val_fraction, predict_num_samples)
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels}")
        self.image_size, self.channels = image_size, channels
        self.random_flip, self.test_dir = random_flip, test_dir
        self._files: list[Path] | None = None
        try:
            found = class_folders(data_dir, self.files())
        except FileNotFoundError:  # refused by name in setup, where the images are read
            found = None
        self.classes = sorted(set(found)) if found else []

    def files(self) -> list[Path]:
        """The training folder's images (``list_images``), listed once."""
        if self._files is None:
            self._files = list_images(self.data_dir)
        return self._files

    def _dataset(self, root: str, files: list[Path], flip: bool) -> UInt8Images:
        steps = [v2.Resize(self.image_size), v2.CenterCrop(self.image_size), v2.PILToTensor()]
        steps += [v2.RandomHorizontalFlip()] if flip else []
        images = ImageFiles(files, "L" if self.channels == 1 else "RGB", v2.Compose(steps))
        return UInt8Images(images, labels=self._labels(root, files))

    def _labels(self, root: str, files: list[Path]) -> Tensor | None:
        """Each file's class index in ``classes`` (the training folder's), by its sub-folder's name; None unlabelled."""
        names = class_folders(root, files) if self.classes else None
        if names is None:
            return None
        unknown = sorted(set(names) - set(self.classes))
        if unknown:
            raise ValueError(f"{root!r} has class folders {unknown} that the training folder {self.data_dir!r} lacks "
                             f"(its classes: {self.classes})")
        return torch.tensor([self.classes.index(n) for n in names])

    def setup(self, stage: str) -> None:
        if stage == "predict":
            return  # generation reads no images
        files = self.files()
        train, val = self.split(range(len(files)))
        if stage in ("fit", "validate"):
            self.train_set = Subset(self._dataset(self.data_dir, files, self.random_flip), train.indices)
            self.val_set = Subset(self._dataset(self.data_dir, files, False), val.indices)
        if stage == "test":
            if self.test_dir:
                self.test_set = self._dataset(self.test_dir, list_images(self.test_dir), False)
            else:
                self.test_set = Subset(self._dataset(self.data_dir, files, False), val.indices)

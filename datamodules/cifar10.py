"""CIFAR-10 (32×32 RGB) scaled to [-1, 1], with random horizontal flips for training."""

from pathlib import Path

import torch
from torch.utils.data import Subset
from torchvision.datasets import CIFAR10
from torchvision.transforms import v2

from datamodules.base import ImageDataModule, UInt8Images, fetch_if_missing, read_or_explain, require_files

FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 read by torchvision from ``<data_dir>/cifar-10-batches-py``; 50,000 train (minus validation), 10,000 test."""

    image_size = 32
    channels = 3
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]  # torchvision's order

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 512,
        num_workers: int = 0,
        download: bool = True,
        val_fraction: float = 0.02,
        random_flip: bool = True,
        predict_num_samples: int = 50000,
    ):
        """
        Args:
            data_dir: folder holding ``cifar-10-batches-py`` (torchvision's layout).
            batch_size: images per batch on each device (the global batch is this × devices × nodes).
            num_workers: DataLoader worker processes; the images sit in memory, so 0 is usually fastest.
            download: fetch the archive in ``prepare_data`` if files are missing (needs internet; a no-op
                when they are there).
            val_fraction: share of the training set held out for validation.
            random_flip: random horizontal flips of training images (both papers use them).
            predict_num_samples: images that ``cm-lightning predict`` generates.
        """
        super().__init__(data_dir, batch_size, num_workers, download, val_fraction, predict_num_samples)
        self.random_flip = random_flip

    @property
    def folder(self) -> Path:
        return Path(self.data_dir) / "cifar-10-batches-py"

    def prepare_data(self) -> None:
        if self.download:  # one archive holds both splits
            fetch_if_missing("CIFAR-10", self.folder, FILES, lambda: CIFAR10(self.data_dir, train=True, download=True))

    def _images(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (N, 3, 32, 32) uint8, labels (N,))."""
        folder = self.folder
        require_files("CIFAR-10", folder, FILES)
        data = read_or_explain("CIFAR-10", folder, lambda: CIFAR10(self.data_dir, train=train, download=False))
        return torch.from_numpy(data.data).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(data.targets)

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate"):
            images, labels = self._images(train=True)
            train_idx, val_idx = (s.indices for s in self.split(range(len(images))))
            flip = v2.RandomHorizontalFlip() if self.random_flip else None
            self.train_set = Subset(UInt8Images(images, flip, labels), train_idx)
            self.val_set = Subset(UInt8Images(images, labels=labels), val_idx)
        if stage == "test":
            images, labels = self._images(train=False)
            self.test_set = UInt8Images(images, labels=labels)

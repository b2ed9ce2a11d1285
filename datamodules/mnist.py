"""MNIST, zero-padded from 28×28 to 32×32 so the UNet can halve it, scaled to [-1, 1]."""

from pathlib import Path

import torch.nn.functional as F
from torchvision.datasets import MNIST

from datamodules.base import ImageDataModule, UInt8Images, fetch_if_missing, read_or_explain, require_files

FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


class MNISTDataModule(ImageDataModule):
    """MNIST read by torchvision from ``<data_dir>/MNIST/raw``; 60,000 train (minus validation), 10,000 test."""

    image_size = 32
    channels = 1
    classes = [str(d) for d in range(10)]

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        num_workers: int = 0,
        download: bool = True,
        val_fraction: float = 1 / 60,
        predict_num_samples: int = 10000,
    ):
        """
        Args:
            data_dir: folder holding ``MNIST/raw`` (torchvision's layout); ``../shared/data`` offline.
            batch_size: images per batch on each device (the global batch is this × devices × nodes).
            num_workers: DataLoader worker processes; the images sit in memory, so 0 is usually fastest.
            download: fetch the files in ``prepare_data`` if they are missing (needs internet; a no-op when
                they are there).
            val_fraction: share of the training set held out for validation.
            predict_num_samples: images that ``cm-lightning predict`` generates.
        """
        super().__init__(data_dir, batch_size, num_workers, download, val_fraction, predict_num_samples)

    @property
    def folder(self) -> Path:
        return Path(self.data_dir) / "MNIST" / "raw"

    def prepare_data(self) -> None:
        if self.download:
            fetch_if_missing("MNIST", self.folder, FILES, lambda: MNIST(self.data_dir, train=True, download=True))

    def _load(self, train: bool) -> UInt8Images:
        folder = self.folder
        require_files("MNIST", folder, FILES)
        dataset = read_or_explain("MNIST", folder, lambda: MNIST(self.data_dir, train=train, download=False))
        return UInt8Images(F.pad(dataset.data, (2, 2, 2, 2))[:, None], labels=dataset.targets)  # (N, 1, 32, 32) uint8

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate"):
            self.train_set, self.val_set = self.split(self._load(train=True))
        if stage == "test":
            self.test_set = self._load(train=False)

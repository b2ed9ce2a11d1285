"""LightningDataModules yielding image batches in [-1, 1] that expose ``image_size`` and ``channels``."""

from datamodules.base import ImageDataModule
from datamodules.cifar10 import CIFAR10DataModule
from datamodules.image_folder import ImageFolderDataModule
from datamodules.mnist import MNISTDataModule

__all__ = ["CIFAR10DataModule", "ImageDataModule", "ImageFolderDataModule", "MNISTDataModule"]

"""Shared DataModule plumbing: loaders, the held-out validation split, [-1, 1] scaling."""

import os
import pickle
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler, random_split


def missing_files(folder: Path, files: list[str]) -> list[str]:
    return [f for f in files if not (folder / f).is_file()]


def require_files(name: str, folder: Path, files: list[str]) -> None:
    """Refuse early, naming the folder and the missing files, when a dataset is not on disk."""
    missing = missing_files(folder, files)
    if missing:
        raise FileNotFoundError(
            f"{name} is not in {folder}: missing {', '.join(missing)}. Pass --data.download true to fetch it "
            "(needs internet), or --data.data_dir <folder that holds it in torchvision's layout>."
        )


def fetch_if_missing(name: str, folder: Path, files: list[str], fetch: Callable[[], object]) -> None:
    """``fetch()`` the dataset when files are missing (nothing happens when all are there); a failed
    fetch (offline, say) is reported by folder, files and the way out rather than by a network traceback."""
    missing = missing_files(folder, files)
    if not missing:
        return
    try:
        fetch()
    except (OSError, RuntimeError, ValueError) as err:
        reason = " ".join(str(err).split())
        raise FileNotFoundError(
            f"{name} is not in {folder} (missing {', '.join(missing)}) and fetching it failed "
            f"({type(err).__name__}: {reason[:300]}). Without internet, put the files there in torchvision's "
            "layout, or pass --data.data_dir <folder that holds them>."
        ) from None


def read_or_explain(name: str, folder: Path, read: Callable):
    """``read()``, with unreadable files reported as such rather than as an error deep in torchvision."""
    try:
        return read()
    except (RuntimeError, ValueError, OSError, EOFError, AssertionError, pickle.UnpicklingError) as err:
        raise ValueError(
            f"the {name} files in {folder} cannot be read ({type(err).__name__}: {err}). They may be truncated "
            "or corrupt: delete them and run again to fetch them afresh (--data.download true, the default)."
        ) from err


class UInt8Images(Dataset):
    """uint8 images (N, C, H, W) in memory (or any dataset of them), returned as floats in [-1, 1] after an optional
    transform; with ``labels`` (N,) as (image, label) pairs, which an unconditional model ignores."""

    def __init__(self, images: Tensor | Dataset, transform=None, labels: Tensor | None = None):
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        self.images = images
        self.transform = transform
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor | tuple[Tensor, Tensor]:
        x = self.images[i]
        if self.transform is not None:
            x = self.transform(x)
        x = x.float() / 127.5 - 1
        return x if self.labels is None else (x, self.labels[i])


class EpochSeededSampler(RandomSampler):
    """A random order that is a function of (seed, epoch), so a resumed run sees the batches it would have.

    Lightning calls ``set_epoch`` before each epoch; under DDP it swaps any RandomSampler for its
    DistributedSampler, which is seeded by (seed_everything's seed, epoch) in the same way.
    """

    def __init__(self, data_source: Dataset, seed: int):
        super().__init__(data_source, generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + epoch)


class ResumableLoader(DataLoader):
    """A DataLoader that resumes mid-epoch: its first pass skips the batches already trained on.

    Lightning restarts an interrupted epoch from its first batch. Here the first ``__iter__`` skips
    ``batches_done() mod len(self)`` batches of the epoch's (seeded) order, as indices, so no image is
    loaded for nothing and a resumed run trains on exactly the batches of the uninterrupted one.
    """

    def __init__(self, *args, batches_done: Callable[[], int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches_done = batches_done
        self._skip = 0
        self._first = True

    @property
    def _index_sampler(self):
        sampler = super()._index_sampler
        return _SkipFirst(sampler, self._skip) if self._skip else sampler

    def __iter__(self):
        if self._first and self.batches_done is not None:
            self._skip = self.batches_done() % len(self)
        self._first = False
        try:
            return super().__iter__()  # the iterator reads _index_sampler now
        finally:
            self._skip = 0

    def state_dict(self) -> dict:
        return {}  # the position is the trainer's global step, already in the checkpoint

    def load_state_dict(self, state: dict) -> None:
        pass


class _SkipFirst:
    def __init__(self, batches, skip: int):
        self.batches, self.skip = batches, skip

    def __iter__(self) -> Iterator:
        return islice(iter(self.batches), self.skip, None)

    def __len__(self) -> int:
        return len(self.batches) - self.skip


class ImageDataModule(LightningDataModule):
    """Base class: subclasses fill ``self.train_set``, ``self.val_set`` and ``self.test_set`` in ``setup``.

    ``predict`` needs no images: its loader yields the indices 0 … predict_num_samples − 1 of the images
    to generate, which Lightning splits across ranks; the module seeds each image's noise by its index.
    """

    image_size: int
    channels: int
    classes: list[str] = []  # class names, label i is classes[i]; empty: the data has no labels

    @property
    def num_classes(self) -> int:
        """K, the classes the data is labelled with (0: unlabelled); a class-conditional network must have as many."""
        return len(self.classes)

    def __init__(
        self,
        data_dir: str,
        batch_size: int,
        num_workers: int,
        download: bool,
        val_fraction: float,
        predict_num_samples: int = 10000,
        seed: int = 0,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
        if predict_num_samples < 1:
            raise ValueError(f"predict_num_samples must be >= 1, got {predict_num_samples}")
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.download = download
        self.val_fraction = val_fraction
        self.predict_num_samples = predict_num_samples
        self.seed = seed

    def pixel_statistics(self, max_images: int = 10000) -> dict[str, float]:
        """Mean, standard deviation and root mean square of the training images' pixels in [-1, 1] (the first
        ``max_images`` of the training split), the candidates for a model's σ_data: EDM's derivation of c_skip,
        c_out and c_in takes σ_data as the data's spread around 0, so for data whose mean is far from 0 (MNIST:
        −0.74) the RMS, not the standard deviation, is the scale the network sees. Calls ``setup("fit")``."""
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        self.setup("fit")
        count = total = squares = 0.0
        for i in range(min(max_images, len(self.train_set))):
            x = self.train_set[i]
            x = (x[0] if isinstance(x, (tuple, list)) else x).double()
            count, total, squares = count + x.numel(), total + x.sum().item(), squares + x.square().sum().item()
        mean, mean_square = total / count, squares / count
        return {"mean": mean, "std": max(mean_square - mean ** 2, 0.0) ** 0.5, "rms": mean_square ** 0.5,
                "images": int(min(max_images, len(self.train_set)))}

    def split(self, dataset: Dataset) -> tuple[Dataset, Dataset]:
        """Hold out ``val_fraction`` of ``dataset``, the same images on every run and rank."""
        n_val = max(1, round(len(dataset) * self.val_fraction))
        return tuple(random_split(dataset, [len(dataset) - n_val, n_val], torch.Generator().manual_seed(self.seed)))

    def _loader(self, dataset: Dataset, shuffle: bool, **kwargs) -> DataLoader:
        return ResumableLoader(
            dataset,
            **kwargs,
            batch_size=self.batch_size,
            sampler=EpochSeededSampler(dataset, int(os.getenv("PL_GLOBAL_SEED", 0))) if shuffle else None,
            drop_last=shuffle and len(dataset) >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True, batches_done=self._batches_done)

    def _batches_done(self) -> int:
        trainer = self.trainer
        return trainer.global_step * trainer.accumulate_grad_batches if trainer is not None else 0

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(torch.arange(self.predict_num_samples), batch_size=self.batch_size)

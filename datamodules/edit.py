"""What ``cm-lightning predict --edit.kind ...`` edits: reference images (any size, resized as the image-folder
DataModule does), masks, seeded noise, in batches for ``Trainer.predict``.

The edit runs as ``predict`` so that it uses every device, node and precision ``predict`` does: Lightning
splits the items over the ranks, the module applies ``EditTask`` (``cm_lightning.sampling.editing``) with its
evaluation network, and ``SampleWriter`` writes one result per reference and one overview grid per batch.
The geometry (image size, channels) is the model's, which the preset's ``--config`` gives; the images are
brought to it.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from cm_lightning.core.noise import indexed_noise
from cm_lightning.sampling.editing import EDITS, EditTask
from cm_lightning.core.karras import SIGMA_MAX, SIGMA_MIN
from datamodules.image_folder import ImageFiles, list_images

MASKS = ("box", "left", "right", "top", "bottom", "strokes")
# The replacement loop's default noise levels: halving from σ_max (ours: on the quick-start's MNIST model these
# eight gave cleaner inpainting than four levels (80, 20, 5, 1) or a start at 10, at a few evaluations per image).
EDIT_SIGMAS = (80.0, 40.0, 20.0, 10.0, 5.0, 2.5, 1.2, 0.6)


def builtin_mask(name: str, size: int, generator: torch.Generator | None = None) -> Tensor:
    """A (size, size) bool mask of the pixels to keep (True) for a built-in name of MASKS; the region named
    is the one to fill: "box" the centre square of half the side, "left" / "right" / "top" / "bottom" that
    half, "strokes" a few random thick strokes drawn from ``generator``."""
    fill = torch.zeros(size, size, dtype=torch.bool)
    half, quarter = size // 2, size // 4
    if name == "box":
        fill[quarter:quarter + half, quarter:quarter + half] = True
    elif name == "left":
        fill[:, :half] = True
    elif name == "right":
        fill[:, half:] = True
    elif name == "top":
        fill[:half] = True
    elif name == "bottom":
        fill[half:] = True
    elif name == "strokes":
        fill = strokes(size, generator)
    else:
        raise ValueError(f"built-in masks are {MASKS}, got {name!r}")
    return ~fill


def strokes(size: int, generator: torch.Generator | None = None, num_strokes: int = 4, vertices: int = 4) -> Tensor:
    """A (size, size) bool mask of random brush strokes: polylines of random direction and length (⅛ to ⅓ of
    the side per segment), width about a tenth of the side, each starting anywhere in the image."""
    radius = max(size / 20, 0.75)
    pixel = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij"), -1).reshape(-1, 2).float()
    points = []
    for _ in range(num_strokes):
        at = torch.rand(2, generator=generator) * (size - 1)
        for _ in range(vertices):
            angle = torch.rand((), generator=generator) * 2 * torch.pi
            length = size * (1 / 8 + torch.rand((), generator=generator) * (1 / 3 - 1 / 8))
            end = (at + length * torch.stack([torch.cos(angle), torch.sin(angle)])).clamp(0, size - 1)
            t = torch.linspace(0, 1, max(int(length * 2), 2)).unsqueeze(1)
            points.append(at + t * (end - at))
            at = end
    distance = torch.cdist(pixel, torch.cat(points)).min(1).values
    return (distance <= radius).reshape(size, size)


def item_generator(seed: int, index: int) -> torch.Generator:
    """A generator for item ``index`` alone (the bijection of ``indexed_noise``): masks do not depend on batches."""
    return torch.Generator().manual_seed((index + seed * 0x9E3779B9) % 2**32)


def read_mask(path: Path, size: int) -> Tensor:
    """A mask file as a (size, size) bool tensor of the pixels to keep: white (≥ 128) marks the pixels to fill."""
    with Image.open(path) as img:
        if img.size != (size, size):
            raise ValueError(f"mask {path} is {img.size[0]}×{img.size[1]} pixels; this model's images are {size}×{size}")
        pixels = v2.functional.pil_to_tensor(img.convert("L"))[0]
    return pixels < 128


def mask_files(mask: Path, images: Sequence[Path], root: Path) -> list[Path]:
    """The mask of each image: ``mask`` itself when it is a file, else the file of the same relative path and
    stem under the folder ``mask`` (any image extension); a missing one is named."""
    if mask.is_file():
        return [mask] * len(images)
    found = []
    for image in images:
        stem = mask / image.relative_to(root).with_suffix("")
        matches = [stem.with_suffix(ext) for ext in IMG_EXTENSIONS if stem.with_suffix(ext).is_file()]
        if not matches:
            raise FileNotFoundError(f"no mask for {image} in {mask}: expected {stem}.png (or another image extension)")
        found.append(matches[0])
    return found


class Edit:
    """The ``--edit`` arguments of ``cm-lightning predict``: the edit to run instead of sampling (off by default)."""

    def __init__(
        self,
        kind: Literal["inpaint", "colorize", "super_resolve", "denoise", "interpolate"] | None = None,
        images: str | None = None,
        mask: str = "box",
        mask_seed: int = 0,
        sigmas: list[float] | None = None,
        factor: int = 4,
        noise_level: float = 0.5,
        add_noise: bool = True,
        pairs: int = 8,
        steps: int = 9,
        seed: int = 0,
    ):
        """
        Args:
            kind: "inpaint", "colorize" (3-channel models), "super_resolve", "denoise" or "interpolate"; None
                (the default): ``predict`` samples as usual.
            images: folder of reference images, searched recursively, any size (resized and centre-cropped
                to the model's); not used by "interpolate".
            mask: inpainting: the region to fill: a built-in name ("box", "left", "right", "top", "bottom",
                "strokes"), one mask image for all references, or a folder with one mask per reference
                (same relative path and stem). Mask images are the model's size; white marks the pixels to fill.
            mask_seed: seed of the "strokes" masks (reference i's strokes depend on (mask_seed, i) alone).
            sigmas: the replacement loop's noise levels, decreasing (inpaint, colorize, super_resolve);
                None takes (80, 40, 20, 10, 5, 2.5, 1.2, 0.6).
            factor: super-resolution factor p: each p×p patch mean is kept; must divide the image size.
            noise_level: denoise: the Gaussian noise σ of the inputs (in [-1, 1] pixel units).
            add_noise: denoise: add that noise to the references (False: they are noisy already).
            pairs: interpolate: the number of noise pairs (one row each).
            steps: interpolate: slerp weights per row, from 0 to 1.
            seed: noise seed; item i's noise depends on (seed, i) alone, not on batches or ranks.
        """
        if kind is not None and kind not in EDITS:
            raise ValueError(f"--edit.kind must be one of {EDITS} (or unset), got {kind!r}")
        checks = {"factor": (factor, factor >= 1), "pairs": (pairs, pairs >= 1), "steps": (steps, steps >= 2),
                  "seed": (seed, 0 <= seed < 2**31), "mask_seed": (mask_seed, 0 <= mask_seed < 2**31)}
        for name, (value, ok) in checks.items():
            if not ok:
                raise ValueError(f"--edit.{name}={value} is out of range (factor, pairs >= 1; steps >= 2; seeds in [0, 2**31))")
        self.kind, self.images, self.mask, self.mask_seed = kind, images, mask, mask_seed
        self.sigmas = tuple(float(s) for s in (sigmas or EDIT_SIGMAS))
        self.factor, self.noise_level, self.add_noise = factor, noise_level, add_noise
        self.pairs, self.steps, self.seed = pairs, steps, seed

    def task(self, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, channels: int = 3, image_size: int = 32) -> EditTask:
        """The pure edit for a model with this σ range and geometry, every setting checked against it."""
        kind = self.kind
        if kind in ("inpaint", "colorize", "super_resolve"):
            s = self.sigmas
            if any(a <= b for a, b in zip(s, s[1:])) or s[-1] < sigma_min or s[0] > sigma_max:
                raise ValueError(f"--edit.sigmas must decrease within [σ_min, σ_max] = [{sigma_min}, {sigma_max}], got {list(s)}")
        if kind == "colorize" and channels != 3:
            raise ValueError(f"--edit.kind colorize needs a 3-channel (RGB) model; this checkpoint's model has {channels} channel(s)")
        if kind == "super_resolve" and image_size % self.factor:
            raise ValueError(f"--edit.factor={self.factor} does not divide this model's image size {image_size}")
        if kind == "denoise" and not sigma_min <= self.noise_level <= sigma_max:
            raise ValueError(f"--edit.noise_level must lie in [σ_min, σ_max] = [{sigma_min}, {sigma_max}], got {self.noise_level}")
        alphas = tuple(i / (self.steps - 1) for i in range(self.steps))
        return EditTask(kind, self.sigmas, self.factor, self.noise_level, self.add_noise, alphas, sigma_max)

    def datamodule(self, module, batch_size: int, num_workers: int = 0) -> "EditDataModule":
        """The edit's DataModule for ``module`` (a consistency model), every input checked before any work."""
        from cm_lightning.methods.consistency import ConsistencyModule  # (the module layer does not import the data layer)

        if not isinstance(module, ConsistencyModule):
            raise TypeError(
                f"--edit needs a consistency model (CT, iCT, CD, ECT checkpoints); this checkpoint holds a "
                f"{type(module).__name__}. Distil it (configs/mnist_cd.yaml) or tune it (configs/mnist_ect.yaml) first."
            )
        channels, size, _ = module.image_shape
        h = module.hparams
        task = self.task(h.sigma_min, h.sigma_max, channels, size)
        if task.kind == "interpolate":
            return EditDataModule(EditItems(task, [], None, (channels, size), self.seed, count=self.pairs), batch_size, num_workers)
        if self.images is None:
            raise ValueError(f"--edit.kind {task.kind} needs --edit.images <folder of reference images>")
        root = Path(self.images)
        files = list_images(root)
        masks = None
        if task.kind == "inpaint":
            if self.mask in MASKS:
                masks = [self.mask] * len(files)
            elif Path(self.mask).exists():
                masks = [read_mask(p, size) for p in mask_files(Path(self.mask), files, root)]
            else:
                raise ValueError(f"--edit.mask must be one of {MASKS}, a mask image or a folder of masks; {self.mask!r} is none")
        items = EditItems(task, files, masks, (channels, size), self.seed, self.mask_seed)
        return EditDataModule(items, batch_size, num_workers)


class EditItems(Dataset):
    """Item i: {"index", "noise" (num_draws, C, H, W)} and, with references, "reference" in [-1, 1] and, when
    inpainting, "keep" (1, H, W). Without files (interpolation) there are ``count`` items."""

    def __init__(self, task: EditTask, files: list[Path], masks, geometry: tuple[int, int], seed: int, mask_seed: int = 0,
                 count: int = 0):
        channels, size = geometry
        self.task, self.masks, self.seed, self.mask_seed = task, masks, seed, mask_seed
        self.shape = (channels, size, size)
        steps = [v2.Resize(size), v2.CenterCrop(size), v2.PILToTensor()]
        self.images = ImageFiles(files, "L" if channels == 1 else "RGB", v2.Compose(steps)) if files else None
        self.count = len(files) if files else count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        item = {"index": torch.tensor(i), "noise": indexed_noise(self.seed, [i], self.task.num_draws, self.shape)[:, 0]}
        if self.images is not None:
            item["reference"] = self.images[i].float() / 127.5 - 1
        if self.masks is not None:
            mask = self.masks[i]
            if isinstance(mask, str):
                mask = builtin_mask(mask, self.shape[-1], item_generator(self.mask_seed, i))
            item["keep"] = mask.unsqueeze(0)
        return item


class Collate:
    """Stacks the items and attaches the task, which the module applies (a class, so workers can pickle it)."""

    def __init__(self, task: EditTask):
        self.task = task

    def __call__(self, items: list[dict]) -> dict:
        return default_collate(items) | {"task": self.task}


class EditDataModule(LightningDataModule):
    """The predict loader of an edit: references (or noise pairs), masks and noise, seeded per item."""

    def __init__(self, items: EditItems, batch_size: int, num_workers: int = 0):
        super().__init__()
        self.items, self.batch_size, self.num_workers = items, batch_size, num_workers

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.items, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=Collate(self.items.task))

"""Writes what ``cm-lightning predict`` generates: one PNG per image and/or one ``samples.npz``; with
``--edit.kind``, one PNG per edited image and an overview grid per batch."""

import zipfile
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor
from torchvision.io import write_png
from torchvision.utils import make_grid

from cm_lightning.io.files import atomic_write

FORMATS = ("png", "npz")


class SampleWriter(BasePredictionWriter):
    """Saves the images of ``predict`` as ``<index>.png`` files and/or ``samples.npz``.

    ``samples.npz`` holds one uint8 array ``arr_0`` of shape (N, H, W, C) in index order, the layout
    the common FID/precision-recall evaluation scripts read; a class-conditional model's also ``arr_1``, the
    (N,) int64 class of each image (``--model.predict_labels``), as ADM's samplers write it. Every rank writes the PNGs of its own
    indices; for the ``.npz`` each rank leaves its part in the folder and rank zero joins them, so
    under multi-node DDP ``output_dir`` must be on a shared file system. Files appear under their
    final names only when complete (written to a hidden temporary name, then renamed), and the same
    seed gives byte-identical files.
    """

    def __init__(self, output_dir: str | None = None, formats: list[str] = ["png", "npz"]):
        """
        Args:
            output_dir: folder for the samples; None is ``<log_dir>/predictions`` of the run.
            formats: "png" (one file per image) and/or "npz" (one array of all images).
        """
        super().__init__(write_interval="batch")
        if not formats or any(f not in FORMATS for f in formats):
            raise ValueError(f"formats must be a non-empty list drawn from {FORMATS}, got {formats}")
        self.output_dir, self.formats = output_dir, formats
        self._parts: list[tuple[Tensor, Tensor, Tensor | None]] = []
        self._edited = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "predict":
            return
        self.folder = Path(self.output_dir or Path(trainer.log_dir or trainer.default_root_dir) / "predictions")
        if self.folder.is_dir() and any(self._ours(p) for p in self.folder.iterdir()):  # never overwrite samples
            raise FileExistsError(f"{self.folder} already holds samples: choose another output_dir or move them away")
        trainer.strategy.barrier()  # no rank writes before every rank has checked the folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self._parts, self._edited = [], False

    @staticmethod
    def _ours(path: Path) -> bool:
        return path.suffix == ".png" or path.name == "samples.npz"

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        if isinstance(prediction, dict):
            return self.write_edits(prediction)
        images, indices = to_uint8(prediction).cpu(), batch.cpu()
        if "png" in self.formats:
            for index, image in zip(indices.tolist(), images):
                atomic_write(self.folder / f"{index:06d}.png", lambda tmp: write_png(image, str(tmp)))
        if "npz" in self.formats:
            self._parts.append((indices, images, pl_module.labels_for_indices(indices)))

    def write_edits(self, out: dict) -> None:
        """An edit batch (``--edit.kind``): ``<index>.png`` per result (``interpolate``: the row of one noise
        pair) and ``overview_<first index>.png``: references, inputs and results as rows (``interpolate``: one
        row per pair). Edits write PNGs only."""
        indices = out["index"].cpu().tolist()
        result = out["result"].cpu()
        for index, image in zip(indices, result):
            if image.dim() == 4:  # a row of interpolations
                image = make_grid(image, nrow=len(image), padding=0)
            atomic_write(self.folder / f"{index:06d}.png", lambda tmp: write_png(to_uint8(image), str(tmp)))
        if result.dim() == 5:
            rows, ncol = result.flatten(0, 1), result.shape[1]
        else:
            rows, ncol = torch.cat([out["reference"].cpu(), out["degraded"].cpu(), result]), len(result)
        grid = to_uint8(make_grid(rows, nrow=ncol, padding=2, pad_value=1.0))
        atomic_write(self.folder / f"overview_{indices[0]:06d}.png", lambda tmp: write_png(grid, str(tmp)))
        self._edited = True

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        if self._edited:
            return
        if "npz" not in self.formats:
            return
        rank_file = self.folder / f".part{trainer.global_rank}.pt"
        indices, images, labels = torch.empty(0), None, None
        if self._parts:
            indices, images = torch.cat([p[0] for p in self._parts]), torch.cat([p[1] for p in self._parts])
            labels = None if self._parts[0][2] is None else torch.cat([p[2] for p in self._parts])
        atomic_write(rank_file, lambda tmp: torch.save({"indices": indices, "images": images, "labels": labels}, tmp))
        self._parts = []
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            parts = [torch.load(self.folder / f".part{r}.pt") for r in range(trainer.world_size)]
            parts = [p for p in parts if p["images"] is not None]
            order = torch.cat([p["indices"] for p in parts]).argsort()
            array = torch.cat([p["images"] for p in parts])[order].permute(0, 2, 3, 1).numpy()
            labels = None if parts[0]["labels"] is None else torch.cat([p["labels"] for p in parts])[order].numpy()
            atomic_write(self.folder / "samples.npz", lambda tmp: save_npz(tmp, array, labels))
            for r in range(trainer.world_size):
                (self.folder / f".part{r}.pt").unlink()
        trainer.strategy.barrier()

    def on_predict_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            what = "Edits written to {} (png, overview_*.png)" if self._edited else "Samples written to {} (" + ", ".join(self.formats) + ")"
            print(what.format(self.folder))


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] floats to uint8 pixels, rounding to the nearest level (as torchvision's ``save_image``)."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def save_npz(path: Path, array: np.ndarray, labels: np.ndarray | None = None) -> None:
    """``np.savez(path, array[, labels])`` without the clock: a fixed zip timestamp makes the bytes reproducible."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, values in (("arr_0", array), ("arr_1", labels)):
            if values is not None:
                with archive.open(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, values, allow_pickle=False)


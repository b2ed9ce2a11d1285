"""Checkpoint files that are either complete or absent, whatever kills the run."""

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a hidden file beside its final name, syncs it, then renames it.

    Lightning's own save stages the file in the system temp folder and then *moves* it; when that
    folder is on another file system (local /tmp, shared checkpoint disk: the usual cluster layout)
    the move is a copy, and a kill during it leaves a truncated ``last.ckpt``. A rename within one
    folder is atomic, so a SIGKILL here costs at most the checkpoint being written.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote stores: Lightning's fsspec path
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

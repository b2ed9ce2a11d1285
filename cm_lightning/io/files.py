"""Files that are either complete or absent, whatever kills the run: checkpoints, sample PNGs, ``.npz``."""

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def atomic_write(path: str | Path, write: Callable[[Path], None], durable: bool = False) -> None:
    """``write`` a hidden temporary file beside ``path``, then rename it to ``path``.

    A rename within one folder is atomic, so ``path`` only ever holds a complete file, and a write stopped by an
    exception (a signal's included) removes its temporary file. ``durable``
    also syncs the data to disk before the rename (for checkpoints, which must survive a power loss).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name.lstrip('.')}.tmp")
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # an error or a signal's exception mid-write: no partial temporary file stays behind
        tmp.unlink(missing_ok=True)
        raise


def latest_checkpoint(runs: str | Path = "runs/lightning_logs") -> Path | None:
    """``last.ckpt`` of the newest run (highest ``version_N``) under ``runs`` that has one, else None.

    ``--ckpt_path last`` on the command line resolves to this; failed launches and ``test`` runs leave
    version folders without checkpoints, which are passed over.
    """
    found = {int(p.parts[-3].removeprefix("version_")): p for p in Path(runs).glob("version_*/checkpoints/last.ckpt")
             if p.parts[-3].removeprefix("version_").isdigit()}
    return found[max(found)] if found else None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint with ``atomic_write``: beside its final name, synced, then renamed.

    Lightning's own save stages the file in the system temp folder and then *moves* it; when that
    folder is on another file system (local /tmp, shared checkpoint disk: the usual cluster layout)
    the move is a copy, and a kill during it leaves a truncated ``last.ckpt``. Here a SIGKILL costs
    at most the checkpoint being written.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote stores: Lightning's fsspec path
            return super().save_checkpoint(checkpoint, path, storage_options)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp), durable=True)

"""Fixtures: tiny fake datasets in torchvision's exact on-disk formats, and a tiny trained CLI run."""

import pickle
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import fit_args, write_idx


@pytest.fixture
def fake_mnist(tmp_path: Path) -> Path:
    """``<root>/MNIST/raw`` with 120 train and 30 test images of random 28×28 strokes."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 120), ("t10k", 30)):
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, (n,)))
    return tmp_path


@pytest.fixture
def fake_cifar10(tmp_path: Path) -> Path:
    """``<root>/cifar-10-batches-py`` with the pickled batches torchvision reads (20 images per batch)."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, 20))}
        (folder / name).write_bytes(pickle.dumps(batch))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return tmp_path


@pytest.fixture
def trained_run(fake_mnist, tmp_path) -> Path:
    """The version folder of a 16-step CLI fit on fake MNIST."""
    from cli import main

    main(fit_args(fake_mnist, tmp_path / "runs"))
    return tmp_path / "runs" / "lightning_logs" / "version_0"

"""Fixtures: tiny fake datasets in torchvision's exact on-disk formats, and a tiny network config."""

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TINY_NET = dict(model_channels=8, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[16])


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX file as torchvision's MNIST reads it: magic (0, 0, type 0x08=uint8, ndim), big-endian dims, data."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(payload)
    with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
        f.write(payload)


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


def write_images(folder: Path, n: int, size: tuple[int, int], mode: str = "RGB") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    for i in range(n):
        pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8).squeeze(-1 if channels == 1 else ())
        Image.fromarray(pixels, mode).save(folder / f"{i:03d}.png")

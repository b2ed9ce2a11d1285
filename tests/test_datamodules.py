"""DataModules on fake files in torchvision's on-disk formats: shapes, [-1, 1] scaling, splits, errors."""

from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
import torchvision.datasets.mnist

from datamodules import CIFAR10DataModule, ImageFolderDataModule, MNISTDataModule
from datamodules.mnist import FILES as MNIST_FILES
from tests.helpers import write_idx, write_images


def first_batch(loader):
    return next(iter(loader))


def test_mnist_pads_to_32_and_scales(fake_mnist):
    dm = MNISTDataModule(str(fake_mnist), batch_size=8, val_fraction=0.25)
    dm.prepare_data()
    dm.setup("fit")
    assert (dm.image_size, dm.channels) == (32, 1)
    assert (len(dm.train_set), len(dm.val_set)) == (90, 30)
    x, y = first_batch(dm.train_dataloader())
    assert x.shape == (8, 1, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.all(x[:, :, :2] == -1) and torch.all(x[:, :, :, -2:] == -1)  # zero padding → -1
    assert y.shape == (8,) and y.dtype == torch.long and dm.num_classes == 10 and dm.classes[7] == "7"
    files = torchvision.datasets.MNIST(str(fake_mnist), train=True)
    i = dm.val_set.indices[0]
    image, label = dm.val_set[0]
    assert torch.equal(image[0, 2:30, 2:30], files.data[i].float() / 127.5 - 1) and label == files.targets[i]
    dm.setup("test")
    assert len(dm.test_set) == 30
    assert torch.equal(torch.stack([dm.test_set[j][1] for j in range(30)]), torchvision.datasets.MNIST(str(fake_mnist), train=False).targets)


def test_pixel_statistics_are_those_of_the_training_images(fake_mnist):
    dm = MNISTDataModule(str(fake_mnist), batch_size=8)
    stats = dm.pixel_statistics(max_images=50)
    x = torch.stack([dm.train_set[i][0] for i in range(50)]).double()
    assert stats["images"] == 50
    assert stats["mean"] == pytest.approx(x.mean().item()) and stats["std"] == pytest.approx(x.std(unbiased=False).item())
    assert stats["rms"] == pytest.approx(x.square().mean().sqrt().item())
    assert stats["rms"] ** 2 == pytest.approx(stats["std"] ** 2 + stats["mean"] ** 2)
    with pytest.raises(ValueError, match="max_images must be >= 1, got 0"):
        dm.pixel_statistics(0)


def test_validation_split_is_the_same_every_time(fake_mnist):
    a, b = MNISTDataModule(str(fake_mnist)), MNISTDataModule(str(fake_mnist))
    a.setup("fit"), b.setup("fit")
    assert a.val_set.indices == b.val_set.indices


@pytest.mark.parametrize("make, where", [
    (MNISTDataModule, "MNIST is not in {}/MNIST/raw: missing train-images-idx3-ubyte, train-labels-idx1-ubyte"),
    (CIFAR10DataModule, "CIFAR-10 is not in {}/cifar-10-batches-py: missing data_batch_1, data_batch_2"),
])
def test_missing_files_say_where_which_and_how_to_get_them(tmp_path, make, where):
    dm = make(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=where.format(tmp_path / "nowhere") + ".*--data.download true"):
        dm.setup("fit")


def test_truncated_mnist_is_reported_as_unreadable(fake_mnist):
    images = fake_mnist / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])  # a download cut short
    with pytest.raises(ValueError, match=r"the MNIST files in .*MNIST/raw cannot be read .*truncated or corrupt"):
        MNISTDataModule(str(fake_mnist)).setup("fit")


def test_corrupt_cifar10_is_reported_as_unreadable(fake_cifar10, skip_cifar_md5):
    (fake_cifar10 / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"the CIFAR-10 files in .*cifar-10-batches-py cannot be read"):
        CIFAR10DataModule(str(fake_cifar10)).setup("fit")


def test_truncated_image_names_the_file(tmp_path):
    write_images(tmp_path / "imgs", 4, (32, 32))
    bad = tmp_path / "imgs" / "002.png"
    bad.write_bytes(bad.read_bytes()[:60])
    dm = ImageFolderDataModule(str(tmp_path / "imgs"), batch_size=4, num_workers=0, val_fraction=0.25)
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"cannot read image .*002.png"):
        [dm.train_set[i] for i in range(len(dm.train_set))] + [dm.val_set[0]]


@pytest.fixture
def skip_cifar_md5(monkeypatch):
    """Fake batches cannot match torchvision's md5 sums; the format and the reading stay real."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)


def test_cifar10_reads_batches_and_flips(fake_cifar10, skip_cifar_md5):
    dm = CIFAR10DataModule(str(fake_cifar10), batch_size=10, val_fraction=0.1)
    dm.setup("fit")
    assert (dm.image_size, dm.channels) == (32, 3)
    assert (len(dm.train_set), len(dm.val_set)) == (90, 10)
    x, y = first_batch(dm.train_dataloader())
    assert x.shape == (10, 3, 32, 32) and x.min() >= -1 and x.max() <= 1 and y.shape == (10,)
    files = torchvision.datasets.CIFAR10(str(fake_cifar10))
    raw = torch.from_numpy(files.data).permute(0, 3, 1, 2)
    i = dm.train_set.indices[0]
    want = raw[i].float() / 127.5 - 1
    assert dm.train_set[0][1] == files.targets[i] and dm.classes == files.classes
    draws = torch.stack([dm.train_set[0][0] for _ in range(40)])
    assert all(torch.equal(d, want) or torch.equal(d, want.flip(-1)) for d in draws)  # the image or its mirror
    assert any(torch.equal(d, want) for d in draws) and any(torch.equal(d, want.flip(-1)) for d in draws)
    assert torch.equal(dm.val_set[0][0], raw[dm.val_set.indices[0]].float() / 127.5 - 1)  # no flips in validation
    dm.setup("test")
    assert len(dm.test_set) == 20


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_class_subfolders_and_resizing(tmp_path, channels):
    write_images(tmp_path / "cats", 6, (48, 40))
    write_images(tmp_path / "dogs", 6, (40, 48), mode="L")
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, channels=channels, batch_size=4, num_workers=0, val_fraction=0.25)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (9, 3)
    x, y = first_batch(dm.train_dataloader())
    assert x.shape == (4, channels, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert dm.classes == ["cats", "dogs"] and dm.num_classes == 2
    files = sorted((tmp_path / "cats").iterdir()) + sorted((tmp_path / "dogs").iterdir())
    for j, i in enumerate(dm.train_set.indices):  # each image's label is its folder's
        assert dm.train_set[j][1] == (files[i].parent.name == "dogs")


def test_image_folder_flat_and_test_dir(tmp_path):
    write_images(tmp_path / "train", 10, (32, 32), mode="RGBA")
    write_images(tmp_path / "ref", 4, (32, 32))
    dm = ImageFolderDataModule(str(tmp_path / "train"), image_size=32, num_workers=0, test_dir=str(tmp_path / "ref"))
    dm.setup("test")
    assert len(dm.test_set) == 4 and dm.test_set[0].shape == (3, 32, 32)  # a flat folder: images without labels
    assert dm.num_classes == 0


def test_image_folder_test_dir_classes_must_be_the_training_ones(tmp_path):
    write_images(tmp_path / "train" / "a", 3, (8, 8)), write_images(tmp_path / "train" / "b", 3, (8, 8))
    write_images(tmp_path / "ref" / "b", 2, (8, 8))
    dm = ImageFolderDataModule(str(tmp_path / "train"), image_size=8, num_workers=0, test_dir=str(tmp_path / "ref"))
    dm.setup("test")
    assert [dm.test_set[i][1].item() for i in range(2)] == [1, 1]  # "b" is class 1 of the training folder
    write_images(tmp_path / "ref" / "c", 1, (8, 8))
    with pytest.raises(ValueError, match=r"class folders \['c'\] that the training folder .* lacks"):
        dm.setup("test")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: ImageFolderDataModule(str(p), channels=4), r"channels must be 1 \(greyscale\) or 3 \(RGB\), got 4"),
        (lambda p: MNISTDataModule(str(p), batch_size=0), "batch_size must be >= 1, got 0"),
        (lambda p: CIFAR10DataModule(str(p), val_fraction=1.0), r"val_fraction must lie in \(0, 1\), got 1.0"),
    ],
)
def test_bad_datamodule_arguments_are_named(tmp_path, make, message):
    with pytest.raises(ValueError, match=message):
        make(tmp_path)


def test_image_folder_without_images_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("no pictures here")
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderDataModule(str(tmp_path)).setup("fit")


def test_missing_mnist_is_fetched_by_default_and_present_files_are_left_alone(tmp_path, monkeypatch):
    """The presets' plain command on a machine with internet: torchvision's download, with the network
    replaced by a writer of fake files in the IDX format torchvision reads."""
    fetched = []

    def fake_download(url, download_root, filename, md5):
        fetched.append(filename)
        name = filename.removesuffix(".gz")
        shape = (60 if name.startswith("train") else 10,) + ((28, 28) if "images" in name else ())
        write_idx(Path(download_root) / name, np.random.default_rng(0).integers(0, 256, shape))

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", fake_download)
    dm = MNISTDataModule(str(tmp_path / "data"))
    assert dm.download  # the default
    dm.prepare_data()
    assert sorted(fetched) == sorted(f + ".gz" for f in MNIST_FILES)
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 60
    dm.prepare_data()  # everything is there now: no second fetch
    assert len(fetched) == 4


@pytest.mark.parametrize("make, module, files", [
    (MNISTDataModule, torchvision.datasets.mnist, "MNIST is not in {}/MNIST/raw \\(missing train-images-idx3-ubyte"),
    (CIFAR10DataModule, torchvision.datasets.cifar, "CIFAR-10 is not in {}/cifar-10-batches-py \\(missing data_batch_1"),
])
def test_an_offline_fetch_names_the_folder_the_files_and_the_way_out(tmp_path, monkeypatch, make, module, files):
    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(module, "download_and_extract_archive", offline)
    with pytest.raises(FileNotFoundError, match=files.format(tmp_path) + r".*fetching it failed .*name resolution.*"
                       r"Without internet, put the files there .* or pass --data.data_dir") as info:
        make(str(tmp_path)).prepare_data()
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no network traceback attached

"""Shared test helpers: tiny networks, Trainers and CLI arguments (tests never import each other)."""

import gzip
import struct
from pathlib import Path

import numpy as np
import lightning
import torch
from PIL import Image
from lightning.pytorch import Trainer

from cm_lightning import ConsistencyTrainingModule, DiffusionModule, UNet

TINY_NET = dict(model_channels=8, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[16])
MAX_STEPS = 16  # of the CLI runs made by ``fit_args``


NET_ARGS = ("image_size", "channels", "model_channels", "channel_mult", "num_res_blocks", "attn_resolutions", "dropout",
            "embedding_type", "num_classes")


def tiny_net(**kwargs) -> UNet:
    """The tiny UNet (16×16, one channel unless told)."""
    return UNet(**{"image_size": 16, "channels": 1, **TINY_NET, **kwargs})


def tiny(cls=ConsistencyTrainingModule, **kwargs):
    """A module of class ``cls`` over the tiny UNet; UNet arguments among ``kwargs`` go to the network."""
    net = tiny_net(**{k: kwargs.pop(k) for k in list(kwargs) if k in NET_ARGS})
    return cls(net=net, **kwargs)


def module_checkpoint(path: Path, cls=DiffusionModule, **kwargs) -> Path:
    """A checkpoint of a tiny randomised module (a diffusion teacher unless told), in Lightning's layout."""
    torch.manual_seed(1)
    m = tiny(cls, ema_decays=[0.9], **kwargs)
    randomise(m)
    checkpoint = {"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams),
                  "pytorch-lightning_version": lightning.__version__}
    m.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def randomise(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)


def make_trainer(tmp_path, **kwargs) -> Trainer:
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0)
    return Trainer(**{**defaults, **kwargs})


def tiny_args(data_dir: Path, model: str = "ConsistencyTrainingModule") -> list[str]:
    return [
        "--data", "MNISTDataModule", f"--data.data_dir={data_dir}", "--data.batch_size=8", "--model", model,
        "--model.net", "cm_lightning.UNet", "--model.net.model_channels=8", "--model.net.channel_mult=[1, 2]",
        "--model.net.num_res_blocks=1", "--model.net.attn_resolutions=[16]", "--trainer.enable_progress_bar=false",
        "--trainer.accelerator=cpu",
    ]


def fit_args(data_dir: Path, save_dir: Path, *extra: str) -> list[str]:
    return [
        "fit", *tiny_args(data_dir), f"--trainer.max_steps={MAX_STEPS}", "--trainer.log_every_n_steps=1",
        "--trainer.limit_val_batches=1", f"--trainer.logger.init_args.save_dir={save_dir}", *extra,
    ]


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX file as torchvision's MNIST reads it: magic (0, 0, type 0x08=uint8, ndim), big-endian dims, data."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(payload)
    with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
        f.write(payload)


def write_images(folder: Path, n: int, size: tuple[int, int], mode: str = "RGB") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    for i in range(n):
        pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8).squeeze(-1 if channels == 1 else ())
        Image.fromarray(pixels, mode).save(folder / f"{i:03d}.png")


class PlainConvNet(torch.nn.Module):
    """A user's own network for the ``net`` argument: two convolutions, the noise level added as a bias."""

    def __init__(self, image_size: int = 32, channels: int = 1, width: int = 8):
        super().__init__()
        self.image_size, self.channels = image_size, channels
        self.conv_in = torch.nn.Conv2d(channels, width, 3, padding=1)
        self.conv_out = torch.nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, c_noise):
        return self.conv_out(torch.relu(self.conv_in(x) + c_noise.reshape(-1, 1, 1, 1)))

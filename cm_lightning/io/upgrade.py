"""Checkpoints written before the network became an argument (cm-lightning 0.1) in today's layout.

    python -m cm_lightning.io.upgrade OLD.ckpt NEW.ckpt

0.1 stored the UNet's settings as flat module arguments (``model_channels``, ``channel_mult``, …) and the
predict schedule as ``predict_sigmas``; the weights' names are unchanged. ``load_from_checkpoint``
upgrades such a file in memory; the command line (``--ckpt_path``) asks for this conversion first.
"""

import argparse
import io
from pathlib import Path

import torch

from cm_lightning.io.files import atomic_write

UNET_ARGS = ("image_size", "channels", "model_channels", "channel_mult", "num_res_blocks", "attn_resolutions",
             "dropout", "embedding_type")


def is_legacy(hparams: dict) -> bool:
    return "model_channels" in hparams and "net" not in hparams


def upgrade_hparams(hparams: dict) -> dict:
    """0.1 hyper-parameters → today's: the UNet's settings under ``net``, ``predict_sigmas`` → ``predict_sampler``."""
    new = {k: v for k, v in hparams.items() if k not in UNET_ARGS and k != "predict_sigmas"}
    new["net"] = {"class_path": "cm_lightning.nets.unet.UNet", "init_args": {k: hparams[k] for k in UNET_ARGS if k in hparams}}
    if "predict_sigmas" in hparams:
        new["predict_sampler"] = list(hparams["predict_sigmas"])
    new["_class_path"] = "cm_lightning.methods.consistency_training.ConsistencyTrainingModule"  # 0.1's one method
    new["_instantiator"] = "lightning.pytorch.cli.instantiate_module"
    return new


def upgraded(checkpoint: dict) -> dict:
    """The checkpoint with upgraded hyper-parameters (unchanged when it is already in today's layout)."""
    if is_legacy(checkpoint.get("hyper_parameters", {})):
        checkpoint = {**checkpoint, "hyper_parameters": upgrade_hparams(checkpoint["hyper_parameters"])}
    return checkpoint


def is_legacy_file(path) -> bool:
    """Whether the checkpoint file at ``path`` is in the 0.1 layout (read only when loading it failed)."""
    if not isinstance(path, (str, Path)) or not Path(path).is_file():
        return False
    return is_legacy(torch.load(path, map_location="cpu", weights_only=True).get("hyper_parameters", {}))


def upgraded_file(path) -> io.BytesIO:
    """The checkpoint at ``path`` with upgraded hyper-parameters, as an in-memory file."""
    buffer = io.BytesIO()
    torch.save(upgraded(torch.load(path, map_location="cpu", weights_only=True)), buffer)
    buffer.seek(0)
    return buffer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path, help="checkpoint written by cm-lightning 0.1")
    parser.add_argument("new", type=Path, help="where to write the upgraded checkpoint (never the old file)")
    args = parser.parse_args(argv)
    if args.new.resolve() == args.old.resolve() or args.new.exists():
        parser.error(f"{args.new} exists or is the old file: choose a new path, the old checkpoint is kept")
    checkpoint = torch.load(args.old, map_location="cpu", weights_only=True)
    if not is_legacy(checkpoint.get("hyper_parameters", {})):
        parser.error(f"{args.old} is already in today's layout (its hyper-parameters have 'net')")
    atomic_write(args.new, lambda tmp: torch.save(upgraded(checkpoint), tmp), durable=True)
    print(f"Wrote {args.new}")


if __name__ == "__main__":
    main()

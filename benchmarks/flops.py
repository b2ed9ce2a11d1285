"""FLOPs per training image of every CIFAR-10 preset, counted by ``torch.utils.flop_counter`` over one real
``Trainer.fit`` step (student, target, teacher and JVP passes, backward; matmuls, convolutions and attention, as
MFU counts them), and the model-FLOPs utilisation of the GPU speeds recorded by ``gpu_check.sh``.

    python benchmarks/flops.py            # about a minute on 2 CPU cores; writes results/flops_cifar10.json

MFU = FLOPs per image × training images/s ÷ the card's dense bf16 peak (NVIDIA's datasheet: H200 and H100 SXM
989 TFLOP/s without sparsity). The images/s are read from ``results/gpu_<method>_bf16-mixed.json`` where a GPU
check wrote one (its date and card are kept beside the MFU); FLOPs do not depend on the machine.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from common import ROOT, build_preset_module, load_preset, machine, preset_channels, write_result
from method_speed import teacher_args

METHODS = ("ict", "edm", "cd", "ect", "sct", "scd")
DENSE_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # FLOP/s, datasheets (no sparsity)


class CountStep(Callback):
    """FLOPs of the second training step (the first builds optimizer state): forward, backward, optimizer."""

    def __init__(self):
        self.counter = FlopCounterMode(display=False)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 1:
            self.counter.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 2:
            self.counter.__exit__(None, None, None)


def flops_per_image(config_path: str, batch_size: int) -> float:
    config = load_preset(config_path)
    with tempfile.TemporaryDirectory() as folder:
        module = build_preset_module(config, **teacher_args(config_path, Path(folder)))
        images = torch.rand(3 * batch_size, preset_channels(config), 32, 32) * 2 - 1
        count = CountStep()
        Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                callbacks=[count]).fit(module, DataLoader(images, batch_size=batch_size))
    return count.counter.get_total_flops() / batch_size


def gpu_speed(method: str) -> dict | None:
    path = ROOT / "benchmarks" / "results" / f"gpu_{method}_bf16-mixed.json"
    return json.loads(path.read_text()) if path.exists() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch-size", type=int, default=2, help="FLOPs per image do not depend on it")
    args = parser.parse_args()
    rows = {}
    for method in args.methods:
        config = f"configs/cifar10_{method}.yaml"
        flops = flops_per_image(config, args.batch_size)
        row = {"config": config, "gflop_per_training_image": round(flops / 1e9, 2)}
        speed = gpu_speed(method)
        if speed:
            card = next((c for c in DENSE_BF16_PEAK if c in speed["machine"]), None)
            row["gpu"] = {"date": speed["date"], "machine": speed["machine"], "batch_size": speed["batch_size"],
                          "train_images_per_s": round(speed["train_images_per_s"], 1)}
            if card:
                row["gpu"]["mfu_dense_bf16"] = round(flops * speed["train_images_per_s"] / DENSE_BF16_PEAK[card], 4)
        rows[method] = row
        mfu = row.get("gpu", {}).get("mfu_dense_bf16")
        print(f"{config}: {row['gflop_per_training_image']} GFLOP per training image"
              + (f"; {row['gpu']['train_images_per_s']} images/s on the GPU in bf16 = MFU {mfu:.1%}" if mfu else ""),
              flush=True)
    path = write_result("flops_cifar10", {"date": time.strftime("%Y-%m-%d"), "counted_on": machine(), "methods": rows})
    print(f"written to {path}")


if __name__ == "__main__":
    main()

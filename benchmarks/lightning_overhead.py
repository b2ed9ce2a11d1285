"""What Lightning costs per training step, for every method: ``Trainer.fit`` against a plain PyTorch loop of the same
step, on each MNIST preset (or the presets given), in one run.

    python benchmarks/lightning_overhead.py [--configs configs/mnist_edm.yaml ...] [--steps 60] [--repeats 3]
    python benchmarks/lightning_overhead.py --tiny     # Lightning's own cost per step, in milliseconds

Both sides build the preset's module (its network, method settings and optimizer; the students from a random
teacher of the preset's network, as ``method_speed.py`` does) and train it on the same in-memory batches. The
plain loop is what a user without Lightning would write around the method's own math: ``module.losses(x)``,
backward, the optimizer step and the averages (EMAs, θ⁻), nothing else. ``Trainer.fit`` adds what the module
brings: seeded noise per step, logging calls, the non-finite policy (``--on-nonfinite``), the grad-norm and
checkpoint guard, Lightning's loop. Logger, checkpointing and progress bar are off.

The two sides take turns step by step: after each ``Trainer.fit`` step a callback runs one plain step of a second
module on the same batch, timed on its own and left out of the Lightning step's time (from its start to the next
step's start, so it holds all that Lightning does between two steps). On a shared machine a neighbour slows the
steps of a minute or so, and runs of one side taken in turn spread by up to 30 %; steps taken in turn see the same
machine. The ratio is that of the median steps over ``repeats`` runs (the first ``warmup`` steps of each untimed);
that of the total times is reported beside it. ``--tiny`` shrinks every preset's network (and its teacher's) to
three levels of 8 channels at batch 4, so that the difference of the medians is the host time that Lightning and the
module's per-step extras add. On a GPU each timed plain step is bracketed by synchronisations, which the Lightning
steps then wait for too. Writes ``results/lightning_overhead.json`` (``lightning_overhead_tiny.json``).
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback
from torch.utils.data import DataLoader

from common import (build_preset_module, fit_step_times, load_preset, machine, median, preset_channels, sync, with_net,
                    write_result)
from cm_lightning.core.ema import update_averages
from method_speed import teacher_args

PRESETS = ["mnist_quickstart", "mnist_ct", "mnist_edm", "mnist_cd", "mnist_ect", "mnist_sct", "mnist_scd"]
TINY_NET = {"model_channels": 8, "channel_mult": [1, 1, 1], "num_res_blocks": 1, "attn_resolutions": []}  # ``--tiny``


def build(path: str, on_nonfinite: str, net: dict, teacher: dict):
    """The preset's module with the network settings ``net``; ``teacher``: ``method_speed.teacher_args``'s."""
    config = with_net(load_preset(path), net)
    optimizer = config["model"]["init_args"].get("optimizer")
    overrides = {"on_nonfinite": on_nonfinite}
    if on_nonfinite == "skip_on_device":  # needs an optimizer that drops a step on the device: the preset's, fused
        optimizer = {**optimizer, "init_args": {**optimizer.get("init_args", {}), "fused": True}}
        config = {**config, "model": {**config["model"], "init_args": {**config["model"]["init_args"], "optimizer": optimizer}}}
    return build_preset_module(config, **overrides, **teacher)


def prepared_by_hand(module, steps: int, device):
    """What ``fit`` sets up before the first step, done without a Trainer: teacher, starting weights, lengths."""
    module.to(device)
    module.configure_model()
    if hasattr(module, "load_teacher") and (module.teacher_required or module.hparams.get("teacher")):
        module.load_teacher()
    if hasattr(module, "on_fit_start"):
        module.on_fit_start()  # init_from / the teacher's weights
    for name, value in (("_total_steps", steps), ("_stage_steps", max(1, steps // 4))):
        if hasattr(module, name):
            setattr(module, name, value)
    optimizers = module.configure_optimizers()
    return optimizers["optimizer"] if isinstance(optimizers, dict) else optimizers


def plain_step(module, steps: int, device):
    """One step of the plain loop on a batch: the method's losses, backward, the optimizer, the averages."""
    optimizer = prepared_by_hand(module, steps, device)

    def step(x):
        loss = module.losses(x).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_averages(module.averaged_networks(), module.online)

    return step


class PairedPlainSteps(Callback):
    """After each ``Trainer.fit`` step, one plain-loop step of another module on the same batch, timed on its own:
    the two sides alternate step by step, so both see the machine as it is at that moment."""

    def __init__(self, step, warmup: int):
        self.step, self.warmup, self.times = step, warmup, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sync(pl_module.device)
        start = time.perf_counter()
        self.step(batch)
        sync(pl_module.device)
        if trainer.global_step > self.warmup:  # (counted after the step: the warm-up steps are 1 … warmup)
            self.times.append(time.perf_counter() - start)


def paired_step_times(build_module, args, device: torch.device, data) -> tuple[list[float], list[float]]:
    """Seconds of each timed step of ``Trainer.fit`` and of the plain loop, run in turn on the same batches, each
    side with a module of its own from ``build_module()``."""
    plain = PairedPlainSteps(plain_step(build_module(), args.steps, device), args.warmup)
    module = build_module()
    between = fit_step_times(module, data, args, device, callbacks=[plain])  # each holds one plain step
    return [b - p for b, p in zip(between, plain.times, strict=True)], plain.times


def measure(path: str, args, device: torch.device, folder: Path) -> dict:
    """One preset: ``repeats`` runs of the two sides in turn, step by step."""
    config = load_preset(path)
    batch_size = args.batch_size or config["data"]["init_args"]["batch_size"]
    images = torch.rand(batch_size * (args.steps + 1), preset_channels(config), 32, 32) * 2 - 1
    data = DataLoader(images, batch_size=batch_size, shuffle=True, drop_last=True)
    net = TINY_NET if args.tiny else {}
    teacher = teacher_args(path, folder, net)  # (a student's random teacher, written once)
    run_args = argparse.Namespace(**{**vars(args), "batch_size": batch_size})
    runs = {"lightning": [], "plain": []}
    for _ in range(args.repeats):
        lightning, plain = paired_step_times(lambda: build(path, args.on_nonfinite, net, teacher), run_args, device, data)
        runs["lightning"].append(lightning)
        runs["plain"].append(plain)
    step = {name: median([t for run in times for t in run]) for name, times in runs.items()}
    speeds = {name: [batch_size * len(r) / sum(r) for r in times] for name, times in runs.items()}
    return {
        "batch_size": batch_size, "median_step_ms": {k: 1000 * v for k, v in step.items()},
        "ratio_lightning_over_plain": step["plain"] / step["lightning"],
        "lightning_ms_per_step": 1000 * (step["lightning"] - step["plain"]),
        "runs_images_per_s": speeds,
        "ratio_of_run_totals": sum(sum(r) for r in runs["plain"]) / sum(sum(r) for r in runs["lightning"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=[f"configs/{p}.yaml" for p in PRESETS])
    parser.add_argument("--tiny", action="store_true", help="a network of three 8-channel levels at batch 4: the host time")
    parser.add_argument("--steps", type=int, help="steps per run (default 60, --tiny 400)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, help="default: the preset's (--tiny: 4)")
    parser.add_argument("--on-nonfinite", default="stop", choices=["stop", "skip", "skip_on_device"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--name", help="default: lightning_overhead (--tiny: lightning_overhead_tiny)")
    args = parser.parse_args()
    args.steps = args.steps or (400 if args.tiny else 60)
    args.batch_size = args.batch_size or (4 if args.tiny else None)
    args.precision = "32-true"
    device = torch.device(args.device)
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for path in args.configs:
            rows[path] = row = measure(path, args, device, Path(folder))
            ms = row["median_step_ms"]
            print(f"{path}: median step Lightning {ms['lightning']:.2f} ms, plain {ms['plain']:.2f} ms, ratio "
                  f"{row['ratio_lightning_over_plain']:.3f} (of the total times {row['ratio_of_run_totals']:.3f}), Lightning's "
                  f"{row['lightning_ms_per_step']:.2f} ms per step", flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "device": str(device), "tiny": args.tiny,
              "net": TINY_NET if args.tiny else "the preset's", "steps": args.steps, "warmup": args.warmup,
              "repeats": args.repeats, "on_nonfinite": args.on_nonfinite, "presets": rows}
    name = args.name or ("lightning_overhead_tiny" if args.tiny else "lightning_overhead")
    print(f"written to {write_result(name, result)}")


if __name__ == "__main__":
    main()

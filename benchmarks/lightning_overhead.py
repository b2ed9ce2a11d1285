"""What Lightning costs per training step, for every method: ``Trainer.fit`` against a plain PyTorch loop of the same
step, on each MNIST preset (or the presets given), in one run.

    python benchmarks/lightning_overhead.py [--configs configs/mnist_edm.yaml ...] [--steps 60] [--repeats 3]

Both sides build the preset's module (its network, method settings and optimizer; the students from a random
teacher of the preset's network, as ``method_speed.py`` does) and train it on the same in-memory batches. The
plain loop is what a user without Lightning would write around the method's own math: ``module.losses(x)``,
backward, the optimizer step and the averages (EMAs, θ⁻), nothing else. ``Trainer.fit`` adds what the module
brings: seeded noise per step, logging calls, the non-finite policy (``--on-nonfinite``), the grad-norm and
checkpoint guard, Lightning's loop. Logger, checkpointing and progress bar are off. The two alternate
``repeats`` times; the first ``warmup`` steps are not timed. Writes ``results/lightning_overhead.json``.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from common import build_preset_module, fit_speed, load_preset, loop_speed, machine, median, preset_channels, write_result
from cm_lightning.core.ema import update_averages
from method_speed import teacher_args

PRESETS = ["mnist_quickstart", "mnist_ct", "mnist_edm", "mnist_cd", "mnist_ect", "mnist_sct", "mnist_scd"]


def build(path: str, folder: Path, on_nonfinite: str):
    config = load_preset(path)
    optimizer = config["model"]["init_args"].get("optimizer")
    overrides = {"on_nonfinite": on_nonfinite}
    if on_nonfinite == "skip_on_device":  # needs an optimizer that drops a step on the device: the preset's, fused
        optimizer = {**optimizer, "init_args": {**optimizer.get("init_args", {}), "fused": True}}
        config = {**config, "model": {**config["model"], "init_args": {**config["model"]["init_args"], "optimizer": optimizer}}}
    return build_preset_module(config, **overrides, **teacher_args(path, folder))


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


def plain_speed(module, data, args, device) -> float:
    optimizer = prepared_by_hand(module, args.steps, device)

    def step(x, k):
        loss = module.losses(x).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_averages(module.averaged_networks(), module.online)

    return loop_speed(data, args.steps, args.warmup, args.batch_size, device, step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=[f"configs/{p}.yaml" for p in PRESETS])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--on-nonfinite", default="stop", choices=["stop", "skip", "skip_on_device"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--name", default="lightning_overhead")
    args = parser.parse_args()
    args.precision = "32-true"
    device = torch.device(args.device)
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for path in args.configs:
            config = load_preset(path)
            args.batch_size = config["data"]["init_args"]["batch_size"]
            images = torch.rand(args.batch_size * (args.steps + 1), preset_channels(config), 32, 32) * 2 - 1
            data = DataLoader(images, batch_size=args.batch_size, shuffle=True, drop_last=True)
            runs = {"lightning": [], "plain": []}
            for _ in range(args.repeats):  # alternate, so a noisy neighbour slows both alike
                runs["lightning"].append(fit_speed(build(path, Path(folder), args.on_nonfinite), data, args, device))
                runs["plain"].append(plain_speed(build(path, Path(folder), args.on_nonfinite), data, args, device))
            speed = {k: median(v) for k, v in runs.items()}
            rows[path] = {"images_per_s": speed, "runs": runs, "ratio_lightning_over_plain": speed["lightning"] / speed["plain"]}
            print(f"{path}: Lightning {speed['lightning']:.1f} images/s, plain {speed['plain']:.1f}, "
                  f"ratio {rows[path]['ratio_lightning_over_plain']:.3f}", flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "device": str(device), "steps": args.steps,
              "warmup": args.warmup, "repeats": args.repeats, "on_nonfinite": args.on_nonfinite, "presets": rows}
    print(f"written to {write_result(args.name, result)}")


if __name__ == "__main__":
    main()

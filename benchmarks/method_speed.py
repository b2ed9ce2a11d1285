"""Training and sampling speed of any preset's method (CT/iCT, EDM, CD, ECT, sCT, sCD), in a given precision, eager or
compiled.

    python benchmarks/method_speed.py --config configs/cifar10_edm.yaml --precision bf16-mixed --compile

Runs the real ``Trainer.fit`` of the preset's module (its network, objective, EMAs and target; logger,
checkpointing and progress bar off) on an in-memory stream of random images and times the steps after
``--warmup`` (compilation happens there). A student preset (CD, sCD: ``--model.teacher``; ECT, sCT:
``--model.init_from``) starts from a randomly initialised teacher with the network of the matching ``_edm``
preset, written to a temporary checkpoint: speed does not depend on the weights. Then times sampling with each of the method's evaluation samplers (images/s, network
evaluations per image), and records the peak accelerator memory. Writes benchmarks/results/<name>.json.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from common import (build_preset_module, fit_speed, load_preset, machine, median, preset_channels, timed, with_net,
                    write_result)


TEACHER_ARGS = {"cd": "teacher", "scd": "teacher", "ect": "init_from", "sct": "init_from"}  # preset suffix → argument


def teacher_args(config_path: str, folder: Path, net: dict | None = None) -> dict:
    """The argument naming a (random) diffusion checkpoint that a student preset starts from, or none."""
    arg = TEACHER_ARGS.get(Path(config_path).stem.rpartition("_")[2])
    return {arg: str(teacher_checkpoint(config_path, folder, net))} if arg else {}


def teacher_checkpoint(config_path: str, folder: Path, net: dict | None = None) -> Path:
    """A DiffusionModule checkpoint (random weights) with the network of the ``_edm`` preset beside ``config_path``
    (its settings replaced by those in ``net``, if given)."""
    stem = Path(config_path).stem
    config = load_preset(str(Path(config_path).with_name(stem.rpartition("_")[0] + "_edm.yaml")))
    teacher = build_preset_module(with_net(config, net or {}))
    checkpoint = {"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams)}
    teacher.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, folder / "teacher.ckpt")
    return folder / "teacher.ckpt"


def train_speed(module, args, device: torch.device, channels: int) -> float:
    images = torch.rand(args.batch_size * (args.steps + 1), channels, 32, 32) * 2 - 1
    data = DataLoader(images, batch_size=args.batch_size, drop_last=True, pin_memory=device.type == "cuda")
    return fit_speed(module, data, args, device)


def sampling_speed(module, batch_size: int, device: torch.device, repeats: int) -> dict:
    module.to(device).eval()
    out = {}
    for spec in [module.default_sampler, *module.eval_samplers]:
        sampler = module.sampler(spec)
        if sampler.name in out:
            continue
        run = lambda: module.sample(batch_size, sampler, torch.Generator(device).manual_seed(0))  # noqa: E731
        run()  # warm-up (and compilation)
        out[sampler.name] = {"images_per_s": batch_size / median([timed(run, device) for _ in range(repeats)]),
                             "nfe": sampler.nfe}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/cifar10_ict.yaml")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="timed sampling batches per sampler")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed"])
    parser.add_argument("--compile", nargs="?", const="whole", default=None, choices=["whole", "regional"],
                        help="--model.compile: the whole network (true), or per block (regional)")
    parser.add_argument("--no-sampling", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--name", default=None, help="results/<name>.json; default from the config and settings")
    args = parser.parse_args()
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup must lie in [0, --steps), got {args.warmup}")
    config, device = load_preset(args.config), torch.device(args.device)
    with tempfile.TemporaryDirectory() as folder:
        compile = {None: False, "whole": True, "regional": "regional"}[args.compile]
        module = build_preset_module(config, compile=compile, **teacher_args(args.config, Path(folder)))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        train = train_speed(module, args, device, preset_channels(config))
        wall = time.perf_counter() - start
        memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        sampling = {} if args.no_sampling else sampling_speed(module, args.batch_size, device, args.repeats)
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": machine(), "device": str(device), "config": args.config,
        "method": type(module).__name__, "precision": args.precision, "compile": args.compile,
        "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
        "train_images_per_s": train, "fit_wall_s_including_warmup": wall, "peak_memory_gib": memory,
        "sampling": sampling,
    }
    name = args.name or "speed_{}_{}{}".format(Path(args.config).stem, args.precision, f"_compiled_{args.compile}" * bool(args.compile))
    path = write_result(name, result)
    samples = ", ".join(f"{k} ({v['nfe']} NFE) {v['images_per_s']:.0f} images/s" for k, v in sampling.items())
    print(f"{args.config} {type(module).__name__} {args.precision}{f' compiled ({args.compile})' if args.compile else ''}: train "
          f"{train:.1f} images/s (fit incl. warm-up {wall:.0f} s, peak {memory or 0:.1f} GiB); sampling: {samples or '-'}")
    print(f"written to {path}")


if __name__ == "__main__":
    main()

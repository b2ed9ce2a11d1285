"""Training throughput of ``Trainer.fit`` against a plain PyTorch loop doing the same work; FLOPs, MFU; sampling speed.

    python benchmarks/throughput.py --config configs/mnist_quickstart.yaml
    python benchmarks/throughput.py --config configs/cifar10_ict.yaml --batch-size 8 --steps 8 --repeats 3

Both sides train the preset's network with its recipe on the same in-memory batch stream: the two
forwards, the loss, backward, Adam, and the evaluation-EMA update. Lightning runs with logger,
checkpointing and progress bar off, but with everything the module brings (curriculum, logging calls,
seeded noise, the non-finite guard, the EMA callback). The two alternate, ``repeats`` times; the
first ``warmup`` steps of each run are not timed. Also: FLOPs per training image
(``torch.utils.flop_counter``), the machine's matmul peak measured in the same run, the achieved
fraction of it (MFU), and one- and two-step sampling through ``module.sample`` against the bare network.
"""

import argparse

import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from common import (build_module, fit_speed, load_preset, loop_speed, machine, matmul_peak, median, preset_channels, timed,
                    write_result)
from cm_lightning.core.ema import ema_decay, update_ema
from cm_lightning.core.karras import c_noise, karras_sigmas

AUTOCAST = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def lightning_run(args, config, data, device) -> float:
    return fit_speed(build_module(config, compile=args.compile), data, args, device)


def plain_run(args, config, data, device) -> float:
    """The same training written by hand: what a user without Lightning would run."""
    module = build_module(config, compile=args.compile).to(device)
    module.configure_model()
    module._total_steps = args.steps
    optimizer = module.optimizer_factory(module.online.parameters())
    scaler = torch.amp.GradScaler(device.type) if args.precision == "16-mixed" else None
    dtype = AUTOCAST[args.precision]
    hp = module.hparams

    def step(x, k):
        sigmas = karras_sigmas(module.num_scales(k), hp.sigma_min, hp.sigma_max, hp.rho)
        sigma_n, sigma_next = (s.to(device, torch.float32) for s in module.recipe.draw_pairs(sigmas, len(x)))
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = module.consistency_loss(x, torch.randn_like(x), sigma_n, sigma_next)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if module.target is not None:
            mu = module.recipe.target_ema(module.num_scales(k))
            with torch.no_grad():
                torch._foreach_lerp_(list(module.target.parameters()), list(module.online.parameters()), 1 - mu)
        for decay, ema in zip(hp.ema_decays, module.ema.values()):
            update_ema(ema, module.online, ema_decay(decay, k, hp.ema_warmup))

    return loop_speed(data, args.steps, args.warmup, args.batch_size, device, step)


def flops_per_image(config, batch_size: int, channels: int, device) -> float:
    """FLOPs of one training step (student forward + backward, target forward) per image."""
    module = build_module(config).to(device)
    x = torch.rand(batch_size, channels, 32, 32, device=device) * 2 - 1
    sigma_n = torch.full((batch_size,), 1.0, device=device)
    with FlopCounterMode(display=False) as counter:
        module.consistency_loss(x, torch.randn_like(x), sigma_n, sigma_n * 1.1).backward()
    return counter.get_total_flops() / batch_size


def sampling_speed(config, batch_size: int, channels: int, device, repeats: int) -> dict:
    module = build_module(config).to(device).eval()
    net = module.online.net
    x = torch.randn(batch_size, channels, 32, 32, device=device)
    noise = c_noise(torch.full((batch_size,), 80.0, device=device))
    runs = {
        "bare network forward": lambda: net(x, noise),
        "module.sample, 1 step": lambda: module.sample(batch_size, (80.0,), torch.Generator(device).manual_seed(0)),
        "module.sample, 2 steps": lambda: module.sample(batch_size, (80.0, 0.8), torch.Generator(device).manual_seed(0)),
    }
    out = {}
    with torch.no_grad():
        for name, fn in runs.items():
            fn()
            out[name] = batch_size / median([timed(fn, device) for _ in range(repeats)])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist_quickstart.yaml")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's per-device batch")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", default="32-true", choices=sorted(AUTOCAST))
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--name", default=None, help="results/<name>.json; default from the config")
    args = parser.parse_args()
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup must lie in [0, --steps), got {args.warmup}")
    config = load_preset(args.config)
    args.batch_size = args.batch_size or config["data"]["init_args"]["batch_size"]
    device, channels = torch.device(args.device), preset_channels(config)
    images = torch.rand(args.batch_size * (args.steps + 1), channels, 32, 32) * 2 - 1
    data = DataLoader(images, batch_size=args.batch_size, shuffle=True, drop_last=True)

    runs = {"lightning": [], "plain": []}
    for _ in range(args.repeats):  # alternate, so a noisy neighbour slows both alike
        runs["lightning"].append(lightning_run(args, config, data, device))
        runs["plain"].append(plain_run(args, config, data, device))
    train = {k: median(v) for k, v in runs.items()}
    flops = flops_per_image(config, args.batch_size, channels, device)
    peak = matmul_peak(device, AUTOCAST[args.precision] or torch.float32)
    result = {
        "config": args.config, "machine": machine(), "device": str(device), "precision": args.precision,
        "compile": args.compile, "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
        "repeats": args.repeats, "train_images_per_s_runs": runs, "train_images_per_s_median": train,
        "ratio_lightning_over_plain": train["lightning"] / train["plain"],
        "flops_per_training_image": flops, "achieved_flop_per_s": flops * train["lightning"],
        "matmul_peak_flop_per_s": peak, "mfu": flops * train["lightning"] / peak,
        "sampling_images_per_s": sampling_speed(config, args.batch_size, channels, device, args.repeats),
    }
    name = args.name or f"throughput_{args.config.split('/')[-1].removesuffix('.yaml')}"
    path = write_result(name, result)
    print(f"{args.config}: Lightning {train['lightning']:.1f} images/s, plain loop {train['plain']:.1f} "
          f"(ratio {result['ratio_lightning_over_plain']:.3f}); {flops / 1e9:.2f} GFLOP per training image, "
          f"{result['achieved_flop_per_s'] / 1e9:.1f} GFLOP/s achieved of {peak / 1e9:.1f} peak (MFU {result['mfu']:.1%})")
    for k, v in result["sampling_images_per_s"].items():
        print(f"  sampling: {k}: {v:.1f} images/s")
    print(f"written to {path}")


if __name__ == "__main__":
    main()

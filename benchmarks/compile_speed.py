"""Training and sampling speed with and without ``--model.compile`` on this machine (CPU or GPU).

    python benchmarks/compile_speed.py [--config configs/mnist_quickstart.yaml] [--steps 30] [--repeats 3]

Builds the preset's network three times (eager, compiled whole, compiled per block: ``compile=regional``), warms
each up (compilation happens there: its seconds are the time to the first compiled steps), then times ``steps``
training steps of each, alternating, ``repeats`` times, and one-step sampling.
Prints the medians and the ratios and writes them to ``benchmarks/results/compile_speed.json``.
"""

import argparse
import json
import time

import torch

from common import build_module, load_preset, machine, median, preset_channels, sync, timed, write_result
from cm_lightning.core.karras import karras_sigmas


MODES = {"eager": False, "compiled": True, "regional": "regional"}


def build(config: dict, compile: bool | str, device: str):
    m = build_module(config, ema_decays=[], compile=compile, total_steps=1000)
    m.configure_model()
    return m.to(device)


def train_steps(m, opt, x, steps: int) -> float:
    sigmas = karras_sigmas(m.num_scales(500), 0.002, 80.0, 7.0)
    sync(x.device)
    start = time.perf_counter()
    for _ in range(steps):
        sigma_n, sigma_next = (s.to(x.device, torch.float32) for s in m.recipe.draw_pairs(sigmas, len(x)))
        loss = m.consistency_loss(x, torch.randn_like(x), sigma_n, sigma_next)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(x.device)
    return len(x) * steps / (time.perf_counter() - start)


def sample_speed(m, n: int, repeats: int) -> float:
    m.sample(n, seed=0)  # warm-up / compile
    return n / median([timed(lambda: m.sample(n, seed=0), m.device) for _ in range(repeats)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist_quickstart.yaml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args()
    config = load_preset(args.config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch = args.batch_size or config["data"]["init_args"]["batch_size"]
    nets = {name: build(config, mode, device) for name, mode in MODES.items()}
    x = torch.rand(batch, preset_channels(config), 32, 32, device=device) * 2 - 1
    opts = {k: torch.optim.Adam(m.online.parameters(), lr=1e-4) for k, m in nets.items()}
    warm = {}
    for name, m in nets.items():
        start = time.perf_counter()
        train_steps(m, opts[name], x, 3)
        warm[name] = time.perf_counter() - start
    speeds = {name: [] for name in nets}
    for _ in range(args.repeats):  # alternate, so a noisy neighbour hurts both alike
        for name, m in nets.items():
            speeds[name].append(train_steps(m, opts[name], x, args.steps))
    train = {k: median(v) for k, v in speeds.items()}
    sample = {k: sample_speed(m, batch, args.repeats) for k, m in nets.items()}
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": machine(), "device": device, "config": args.config, "batch": batch, "steps": args.steps, "repeats": args.repeats,
        "warmup_3_steps_s": warm, "train_images_per_s": train, "train_ratio_compiled_over_eager": train["compiled"] / train["eager"],
        "train_ratio_regional_over_eager": train["regional"] / train["eager"],
        "sample_1step_images_per_s": sample, "sample_ratio_compiled_over_eager": sample["compiled"] / sample["eager"],
        "sample_ratio_regional_over_eager": sample["regional"] / sample["eager"],
    }
    print(json.dumps(result, indent=2))
    print(f"written to {write_result('compile_speed', result)}")


if __name__ == "__main__":
    main()

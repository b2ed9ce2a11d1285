"""Training and sampling speed with and without ``--model.compile`` on this machine (CPU or GPU).

    python benchmarks/compile_speed.py [--config configs/mnist_quickstart.yaml] [--steps 30] [--repeats 3]

Builds the preset's network twice (eager, compiled), warms both up (compilation happens there), then
times ``steps`` training steps of each, alternating, ``repeats`` times, and one-step sampling.
Prints the medians and the ratios and writes them to ``benchmarks/results/compile_speed.json``.
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parents[1]))
from cm_lightning import ConsistencyTrainingModule  # noqa: E402
from cm_lightning.karras import karras_sigmas  # noqa: E402


def build(config: dict, compile: bool, device: str) -> ConsistencyTrainingModule:
    keys = ("model_channels", "channel_mult", "num_res_blocks", "attn_resolutions", "dropout", "embedding_type", "recipe", "s0", "s1")
    model = {k: v for k, v in config["model"].items() if k in keys}
    torch.manual_seed(0)
    m = ConsistencyTrainingModule(image_size=32, channels=1 if "mnist" in config["data"]["class_path"].lower() else 3,
                                  **model, ema_decays=[], eval_weights="online", compile=compile, total_steps=1000)
    m.configure_model()
    return m.to(device)


def train_steps(m, opt, x, steps: int) -> float:
    sigmas = karras_sigmas(m.num_scales(500), 0.002, 80.0, 7.0)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        sigma_n, sigma_next = (s.to(x.device, torch.float32) for s in m.recipe.draw_pairs(sigmas, len(x)))
        loss = m.consistency_loss(x, torch.randn_like(x), sigma_n, sigma_next)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync()
    return len(x) * steps / (time.perf_counter() - start)


def sample_speed(m, n: int, repeats: int) -> float:
    m.sample(n, seed=0)  # warm-up / compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        m.sample(n, seed=0)
        times.append(time.perf_counter() - start)
    return n / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist_quickstart.yaml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch = args.batch_size or config["data"]["init_args"]["batch_size"]
    nets = {name: build(config, name == "compiled", device) for name in ("eager", "compiled")}
    x = torch.rand(batch, nets["eager"].hparams.channels, 32, 32, device=device) * 2 - 1
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
    train = {k: statistics.median(v) for k, v in speeds.items()}
    sample = {k: sample_speed(m, batch, args.repeats) for k, m in nets.items()}
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {device}",
        "torch": torch.__version__, "config": args.config, "batch": batch, "steps": args.steps, "repeats": args.repeats,
        "warmup_3_steps_s": warm, "train_images_per_s": train, "train_ratio_compiled_over_eager": train["compiled"] / train["eager"],
        "sample_1step_images_per_s": sample, "sample_ratio_compiled_over_eager": sample["compiled"] / sample["eager"],
    }
    print(json.dumps(result, indent=2))
    out = Path(__file__).parent / "results" / "compile_speed.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

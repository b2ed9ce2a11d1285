"""Shared by the benchmark scripts: build a preset's module, time things, write results."""

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from lightning.pytorch import Callback  # noqa: E402
from lightning.pytorch.cli import instantiate_class  # noqa: E402

from cm_lightning import ConsistencyTrainingModule, UNet  # noqa: E402

METHOD_KEYS = ("recipe", "loss", "s0", "s1", "ema_decays", "ema_warmup")


def load_preset(path: str) -> dict:
    return yaml.safe_load((ROOT / path).read_text())


def preset_channels(config: dict) -> int:
    return 1 if "mnist" in config["data"]["class_path"].lower() else 3


def with_net(config: dict, net: dict) -> dict:
    """The preset ``config`` with its network's settings replaced by those in ``net`` (a copy)."""
    model = config["model"]
    net_config = {**model["init_args"]["net"], "init_args": {**model["init_args"]["net"]["init_args"], **net}}
    return {**config, "model": {**model, "init_args": {**model["init_args"], "net": net_config}}}


def build_module(config: dict, **overrides) -> ConsistencyTrainingModule:
    """The preset's network and recipe (seeded), with its Adam learning rate and no LR schedule."""
    init = config["model"]["init_args"]
    lr = init.get("optimizer", {}).get("init_args", {}).get("lr", 1e-4)
    torch.manual_seed(0)
    net = UNet(image_size=32, channels=preset_channels(config), **init["net"]["init_args"])
    return ConsistencyTrainingModule(
        net=net, **{**{k: v for k, v in init.items() if k in METHOD_KEYS}, "eval_weights": "online", **overrides},
        optimizer=lambda p: torch.optim.Adam(p, lr=lr),
    )


def build_preset_module(config: dict, **overrides):
    """Any preset's module (its class, network, method settings and optimizer), seeded, with no LR schedule.

    Built without the CLI (and so without its data and callbacks), for speed measurements.
    """
    init = dict(config["model"]["init_args"])
    net_config, optimizer = init.pop("net"), init.pop("optimizer", None)
    init.pop("lr_scheduler", None)
    torch.manual_seed(0)
    net_args = {**net_config["init_args"], "image_size": 32, "channels": preset_channels(config)}
    net = instantiate_class((), {"class_path": net_config["class_path"], "init_args": net_args})
    module, _, name = config["model"]["class_path"].rpartition(".")
    cls = getattr(__import__(module, fromlist=[name]), name)
    factory = (lambda p: instantiate_class((p,), optimizer)) if optimizer else None
    return cls(net=net, optimizer=factory, **{**init, **overrides})


class StepTimer(Callback):
    """Wall time of every training step after the first ``warmup`` ones (compilation happens there): ``times`` holds
    the clock at the start of each timed step and at the end of training."""

    def __init__(self, warmup: int):
        self.warmup, self.times = warmup, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.warmup:  # (not batch_idx, which starts again with every epoch)
            if trainer.global_step == self.warmup:
                sync(pl_module.device)
            self.times.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module):
        sync(pl_module.device)
        self.times.append(time.perf_counter())


def fit_step_times(module, data, args, device: torch.device, callbacks: list[Callback] = ()) -> list[float]:
    """Seconds of each ``Trainer.fit`` step (logger, checkpoints, progress bar off) after ``args.warmup`` steps: from
    one step's start to the next's, so each holds everything Lightning does between two steps."""
    from lightning.pytorch import Trainer

    timer = StepTimer(args.warmup)
    trainer = Trainer(
        accelerator=device.type, devices=1, max_steps=args.steps, precision=args.precision, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[timer, *callbacks],
    )
    trainer.fit(module, data)
    return [b - a for a, b in zip(timer.times, timer.times[1:])]


def fit_speed(module, data, args, device: torch.device) -> float:
    """Training images/s of ``Trainer.fit`` (logger, checkpoints, progress bar off) after ``args.warmup`` steps."""
    return args.batch_size * len(times := fit_step_times(module, data, args, device)) / sum(times)


def loop_speed(data, steps: int, warmup: int, batch_size: int, device: torch.device, step) -> float:
    """Images/s of ``step(x, k)`` over the batches of ``data`` (cycled) for ``steps`` steps, the first ``warmup``
    untimed: a plain training loop's speed."""
    k, start = 0, None
    while k < steps:
        for x in data:
            if k == warmup:
                sync(device)
                start = time.perf_counter()
            step(x.to(device, non_blocking=True), k)
            k += 1
            if k == steps:
                break
    sync(device)
    return (steps - warmup) * batch_size / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def matmul_peak(device: torch.device, dtype=torch.float32, n: int = 2048, repeats: int = 10) -> float:
    """The best FLOP/s of an n×n matmul on this device: the machine's practical peak."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    best = min(timed(lambda: a @ b, device) for _ in range(repeats))
    return 2 * n**3 / best


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    isa = torch.backends.cpu.get_cpu_capability()  # the kernels torch picked: same model name, other sums (AVX2/512)
    return f"{cpu} ({isa}), {torch.get_num_threads()} threads{gpu}, torch {torch.__version__}"


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_result(name: str, result: dict) -> Path:
    out = ROOT / "benchmarks" / "results" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out

"""FID per CPU budget on real MNIST: the quick-start net trained with recipe ``ict`` and with ``ct``.

    python benchmarks/quality_mnist.py [--data-dir ../shared/data] [--budget-min 20] [--points 4]

Both recipes train the quick-start preset (same network, seed, batch, optimizer and cosine LR) through
the real CLI for the same wall-clock budget; ``ct`` takes the 2023 paper's own settings (s0 = 2,
s1 = 150, μ0 = 0.9, squared L2), ``ict`` the preset's. The curriculum length K and the cosine period are
what a short calibration run says fits in the budget, the same for both. Checkpoints are taken at
``points`` equally spaced moments of training time; afterwards each is scored with one- and two-step
FID (10,000 samples against the 10,000 MNIST test images, the shipped classifier's features).
Writes ``results/quality_mnist.json``, the FID-versus-time plot ``results/quality_mnist.png`` and the
final one- and two-step grids ``results/quality_mnist_<recipe>_<k>step.png``.
"""

import argparse
import time
from pathlib import Path

from lightning.pytorch import Callback, Trainer
from torchvision.utils import save_image

from common import ROOT, machine, write_result
from callbacks import FID
from cli import build_cli
from cm_lightning import ConsistencyTrainingModule
from datamodules import MNISTDataModule

RESULTS = ROOT / "benchmarks" / "results"
CT_PAPER = ["--model.recipe=ct", "--model.s0=2", "--model.s1=150", "--model.mu0=0.9"]


class TimedCheckpoints(Callback):
    """Saves a checkpoint each time training time (checkpoint writing excluded) passes the next mark,
    and stops training when that time reaches ``budget_s``."""

    def __init__(self, marks_s: list[float], budget_s: float, folder: Path, prefix: str):
        self.marks, self.budget_s, self.folder, self.prefix, self.saved = list(marks_s), budget_s, folder, prefix, []
        self.start, self.paused = None, 0.0

    def on_train_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.marks and self.elapsed() >= self.marks[0]:
            self.marks.pop(0)
            self.save(trainer)
        if self.elapsed() >= self.budget_s:
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module):
        if self.marks or not self.saved or self.saved[-1]["step"] != trainer.global_step:
            self.save(trainer)

    def save(self, trainer) -> None:
        begin = time.perf_counter()
        path = self.folder / f"{self.prefix}_{len(self.saved)}.ckpt"
        trainer.save_checkpoint(path)
        self.saved.append({"train_s": round(self.elapsed(), 1), "step": trainer.global_step, "path": str(path)})
        self.paused += time.perf_counter() - begin


def cli_args(data_dir: str, run_dir: Path, steps: int, extra: list[str]) -> list[str]:
    return [
        "--config", str(ROOT / "configs" / "mnist_quickstart.yaml"), f"--data.data_dir={data_dir}",
        f"--trainer.max_steps={steps}",
        "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={run_dir}", *extra,
    ]


def calibrate(data_dir: str, run_dir: Path, steps: int = 60) -> float:
    """Seconds per training step of the preset on this machine (steps 10 to ``steps``)."""
    extra = ["--trainer.logger=false", f"--trainer.default_root_dir={run_dir}"]
    cli = build_cli(cli_args(data_dir, run_dir, steps, extra), run=False)
    stamps = {}
    cli.trainer.callbacks.append(_StepStamps(stamps, (10, steps - 1)))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return (stamps[steps - 1] - stamps[10]) / (steps - 11)


class _StepStamps(Callback):
    def __init__(self, stamps: dict, at: tuple[int, int]):
        self.stamps, self.at = stamps, at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.at:
            self.stamps[trainer.global_step] = time.perf_counter()


def train(recipe: str, args, steps: int, work: Path) -> list[dict]:
    marks = [args.budget_min * 60 * (i + 1) / args.points for i in range(args.points)]
    cli = build_cli(cli_args(args.data_dir, work / recipe, steps, CT_PAPER if recipe == "ct" else []), run=False)
    checkpoints = TimedCheckpoints(marks[:-1], marks[-1], work, recipe)  # the last mark is the end of training
    cli.trainer.callbacks.append(checkpoints)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return checkpoints.saved


def evaluate(path: str, data_dir: str, num_samples: int) -> dict[str, float]:
    module = ConsistencyTrainingModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    fid = FID(num_samples=num_samples, feature="mnist", batch_size=500)
    trainer = Trainer(accelerator="auto", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_test_batches=1, callbacks=[fid])
    (result,) = trainer.test(module, datamodule=MNISTDataModule(data_dir, batch_size=500), verbose=False)
    return {k.removeprefix("test/"): v for k, v in result.items() if "fid" in k}


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for recipe, color in (("ict", "tab:blue"), ("ct", "tab:red")):
        points = curves[recipe]
        minutes = [p["train_s"] / 60 for p in points]
        for key, style in (("fid_1step", "-o"), ("fid_2step", "--s")):
            ax.plot(minutes, [p[key] for p in points], style, color=color, label=f"{recipe}, {key[4:]}")
    ax.set_xlabel("training time (minutes, this machine)")
    ax.set_ylabel("FID (MNIST classifier features, 10k vs test)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--budget-min", type=float, default=20.0)
    parser.add_argument("--points", type=int, default=4)
    parser.add_argument("--num-samples", type=int, default=10000)
    parser.add_argument("--work-dir", default=str(ROOT / "runs" / "quality_mnist"))
    args = parser.parse_args()
    if args.budget_min <= 0 or args.points < 1 or args.num_samples < 2:
        parser.error("--budget-min must be > 0, --points >= 1 and --num-samples >= 2")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    seconds_per_step = calibrate(args.data_dir, work / "calibration")
    steps = int(args.budget_min * 60 / seconds_per_step)
    print(f"calibration: {seconds_per_step * 1000:.0f} ms per step -> K = {steps} steps for {args.budget_min} min")
    curves = {}
    for recipe in ("ict", "ct"):
        saved = train(recipe, args, steps, work)
        for point in saved:
            point.update(evaluate(point["path"], args.data_dir, args.num_samples))
            print(recipe, point)
        curves[recipe] = saved
        final = ConsistencyTrainingModule.load_from_checkpoint(saved[-1]["path"], map_location="cpu", weights_only=True)
        for sigmas, k in (((80.0,), 1), ((80.0, 0.8), 2)):
            x = final.sample(64, sigmas, seed=0)
            save_image(x, RESULTS / f"quality_mnist_{recipe}_{k}step.png", nrow=8, normalize=True, value_range=(-1, 1))
    RESULTS.mkdir(exist_ok=True)
    plot(curves, RESULTS / "quality_mnist.png")
    result = {
        "machine": machine(), "date": time.strftime("%Y-%m-%d"), "budget_min": args.budget_min,
        "seconds_per_step_calibrated": seconds_per_step, "curriculum_steps_K": steps, "num_samples": args.num_samples,
        "curves": curves, "wall_s_total": round(time.time() - started),
    }
    print(f"written to {write_result('quality_mnist', result)}")


if __name__ == "__main__":
    main()

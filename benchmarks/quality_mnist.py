"""FID against training time on real MNIST for each method's preset: which command for which CPU budget.

    python benchmarks/quality_mnist.py [--stages ict edm cd] [--data-dir ../shared/data] [--points 3]
    python benchmarks/quality_mnist.py --score-only   # finish the scoring of an interrupted run

Every stage trains its preset as a user would (``cm-lightning fit --config configs/<preset>``, the same
settings and length; validation off) and saves checkpoints at ``points`` equally spaced steps, recording
the training time up to each (wall seconds on this machine and the process's CPU seconds; checkpoint
writing excluded). ``cd`` distils and ``ect`` tunes the final checkpoint of ``edm``, trained in the
same run, and the teacher's training time is counted in their totals. Afterwards each checkpoint is scored with FID
(10,000 samples against the 10,000 MNIST test images, the shipped classifier's features): one and two
steps for consistency models (CD also at its own default two steps, its trained level nearest 0.8), Heun with
10 steps (19 network evaluations; it scored better than Heun 18 on the teacher, 142.0 vs 144.7) for the
teacher's final checkpoint only (10,000 Heun samples cost about half as much as training the teacher).

Stages:
    ict  configs/mnist_quickstart.yaml (the quick-start)
    ct   configs/mnist_ct.yaml (the 2023 recipe at the quick-start's size)
    edm  configs/mnist_edm.yaml (the teacher)
    cd   configs/mnist_cd.yaml, --model.teacher <edm's final checkpoint>
    ect  configs/mnist_ect.yaml, --model.init_from <edm's final checkpoint>
    edm_short  configs/mnist_edm.yaml for 1,500 steps (its cosine decay ends there)
    ect_short  configs/mnist_ect.yaml for 1,000 steps from edm_short: the ~15-minute path

Writes ``results/quality_mnist.json`` (stages run now replace the same stages of an earlier run; each
stage keeps its date), the plot ``results/quality_mnist.png`` and the final grids
``results/quality_mnist_<stage>_<sampler>.png``.
"""

import argparse
import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from lightning.pytorch import Callback, Trainer
from torchvision.utils import save_image

from common import ROOT, machine
from callbacks import FID
from cli import build_cli
from datamodules import MNISTDataModule

RESULTS = ROOT / "benchmarks" / "results"
ONE_STEP, TWO_STEPS, HEUN10 = (80.0,), (80.0, 0.8), "heun10"
DEFAULT2 = "default2"  # the model's own two-step sampler (``eval_samplers[1]``; CD: its trained level nearest 0.8)


@dataclass(frozen=True)
class Stage:
    preset: str
    samplers: tuple  # scored at every checkpoint
    final_samplers: tuple = ()  # scored at the final checkpoint only
    extra: tuple = ()
    teacher: str | None = None  # the stage whose final checkpoint this one starts from ...
    teacher_arg: str = "--model.teacher"  # ... given as this argument
    max_steps: int | None = None  # the run's length (its lr schedule and curriculum follow it); None: the preset's
    label: str = field(default="", compare=False)


EDM_LAW = ("--model.p_mean=-1.2", "--model.p_std=1.2")  # EDM's σ law (Table 1); mnist_edm has EDM2's since 2026-12-03
EDM2_LAW = ("--model.p_mean=-0.8", "--model.p_std=1.6")  # EDM2's σ law on ImageNet 64, the mnist_edm preset's
STAGES = {
    "ict": Stage("mnist_quickstart.yaml", (ONE_STEP, TWO_STEPS), label="iCT (quick-start)"),
    "ct": Stage("mnist_ct.yaml", (ONE_STEP, TWO_STEPS), label="CT (mnist_ct)"),
    # the teacher as the preset sets it (EDM2's σ law since 2026-12-03; the table of 2026-11-30 pinned EDM_LAW)
    "edm": Stage("mnist_edm.yaml", (), final_samplers=(HEUN10,), label="EDM teacher"),
    # CD also at its own default two steps (``cm-lightning test``'s: the trained level nearest 0.8, 1.0882)
    "cd": Stage("mnist_cd.yaml", (ONE_STEP, TWO_STEPS, DEFAULT2), teacher="edm", label="CD from the teacher"),
    "ect": Stage("mnist_ect.yaml", (ONE_STEP, TWO_STEPS), teacher="edm", teacher_arg="--model.init_from",
                 label="ECT from the teacher"),
    # the continuous-time methods (sCT from the teacher's weights, sCD from the teacher), second level σ_d tan 1.1
    "sct": Stage("mnist_sct.yaml", (ONE_STEP, (80.0, 0.9824)), teacher="edm", teacher_arg="--model.init_from",
                 label="sCT from the teacher's weights"),
    "scd": Stage("mnist_scd.yaml", (ONE_STEP, (80.0, 0.9824)), teacher="edm", label="sCD from the teacher"),
    # the ~15-minute path: half the teacher, then a short tuning
    "edm_short": Stage("mnist_edm.yaml", (), final_samplers=(HEUN10,), max_steps=1500,
                       label="EDM teacher, 1,500 steps"),
    "ect_short": Stage("mnist_ect.yaml", (ONE_STEP, TWO_STEPS), teacher="edm_short", teacher_arg="--model.init_from",
                       max_steps=1000, label="ECT 1,000 steps from the short teacher"),
}


class StepCheckpoints(Callback):
    """Saves a checkpoint when the global step reaches each of ``marks`` and records the training time
    to it: wall and process CPU seconds since the first training batch, its own writing excluded."""

    def __init__(self, marks: list[int], folder: Path, prefix: str):
        self.marks, self.folder, self.prefix, self.saved = sorted(marks), folder, prefix, []
        self.start = self.start_cpu = None
        self.paused = self.paused_cpu = 0.0

    def on_train_start(self, trainer, pl_module):
        self.start, self.start_cpu = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.marks and trainer.global_step >= self.marks[0]:
            self.marks.pop(0)
            self.save(trainer)

    def save(self, trainer) -> None:
        wall, cpu = time.perf_counter() - self.start - self.paused, time.process_time() - self.start_cpu - self.paused_cpu
        begin, begin_cpu = time.perf_counter(), time.process_time()
        path = self.folder / f"{self.prefix}_step{trainer.global_step}.ckpt"
        trainer.save_checkpoint(path)
        self.saved.append({"step": trainer.global_step, "train_s": round(wall, 1), "train_cpu_s": round(cpu, 1),
                           "path": str(path)})
        self.paused += time.perf_counter() - begin
        self.paused_cpu += time.process_time() - begin_cpu


def preset(stage: Stage) -> dict:
    return yaml.safe_load((ROOT / "configs" / stage.preset).read_text())


def module_class(stage: Stage):
    module, _, name = preset(stage)["model"]["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)


def train(name: str, args, work: Path, teacher: str | None, stage: Stage | None = None, callbacks: tuple = ()) -> list[dict]:
    """Trains ``stage`` (default: ``STAGES[name]``) as its preset's ``fit`` would, with ``callbacks`` added, and
    returns its checkpoints with their training times."""
    stage = stage or STAGES[name]
    steps = min(stage.max_steps or preset(stage)["trainer"]["max_steps"], args.max_steps or float("inf"))
    marks = [round(steps * (i + 1) / args.points) for i in range(args.points)]
    argv = [
        "--config", str(ROOT / "configs" / stage.preset), f"--data.data_dir={args.data_dir}",
        "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={work / name}", f"--trainer.max_steps={steps}", *stage.extra,
    ]
    if teacher:
        argv.append(f"{stage.teacher_arg}={teacher}")
    cli = build_cli(argv, run=False)
    saver = StepCheckpoints(marks, work, name)
    cli.trainer.callbacks[:0] = [*callbacks, saver]  # before the checkpoint callbacks, as Lightning orders them
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if saver.marks:  # stopped early (SIGTERM or Ctrl-C end ``fit`` cleanly): a short run is no result to record
        raise SystemExit(f"{name} stopped at step {cli.trainer.global_step} of {steps}; nothing recorded for it")
    return saver.saved


def fid_key(sampler) -> str:
    """The key a sampler's score is recorded under (the FID callback's, without the ``test/`` prefix)."""
    if sampler == DEFAULT2:
        return "fid_2step_default"
    return f"fid_{sampler}" if isinstance(sampler, str) else f"fid_{len(sampler)}step"


def evaluate(name: str, path: str, samplers: tuple, args) -> dict:
    """FID of each sampler; ``DEFAULT2`` in a pass of its own (its name would be another two-step's), recorded
    with its σ levels."""
    path = ROOT / path  # the results file keeps paths relative to the repository (an absolute one stays)
    module = module_class(STAGES[name]).load_from_checkpoint(path, map_location="cpu", weights_only=True)
    out, plain = {}, [list(s) if isinstance(s, tuple) else s for s in samplers if s != DEFAULT2]
    passes = ([(plain, "")] if plain else []) + ([([module.eval_samplers[1]], "_default")] if DEFAULT2 in samplers else [])
    for given, suffix in passes:
        fid = FID(num_samples=args.num_samples, samplers=given, feature="mnist", batch_size=500)
        trainer = Trainer(accelerator="auto", devices=1, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, limit_test_batches=1, callbacks=[fid])
        (result,) = trainer.test(module, datamodule=MNISTDataModule(args.data_dir, batch_size=500), verbose=False)
        out |= {k.removeprefix("test/") + suffix: round(v, 2) for k, v in result.items() if "fid" in k}
        if suffix:
            out["default2_sigmas"] = [round(s, 4) for s in given[0]]
    return out


def save_grids(name: str, path: str, results: Path) -> None:
    stage = STAGES[name]
    module = module_class(stage).load_from_checkpoint(path, map_location="cpu", weights_only=True)
    for sampler in (s for s in stage.samplers + stage.final_samplers if s != DEFAULT2):
        tag = sampler if isinstance(sampler, str) else f"{len(sampler)}step"
        x = module.sample(64, sampler, seed=0)
        save_image(x, results / f"quality_mnist_{name}_{tag}.png", nrow=8, normalize=True, value_range=(-1, 1))


def train_stage(name: str, args, work: Path, done: dict) -> dict:
    """Train one stage; its points carry the training time, the teacher's added in the totals."""
    stage = STAGES[name]
    teacher = done[stage.teacher] if stage.teacher else None
    started = time.time()
    points = train(name, args, work, teacher["points"][-1]["path"] if teacher else None)
    offset = teacher["points"][-1] if teacher else {"train_s": 0.0, "train_cpu_s": 0.0}
    for point in points:
        point["total_s"] = round(point["train_s"] + offset["train_s"], 1)
        point["total_cpu_s"] = round(point["train_cpu_s"] + offset["train_cpu_s"], 1)
    save_grids(name, points[-1]["path"], Path(args.results_dir))
    return {"label": stage.label, "preset": stage.preset, "extra_args": list(stage.extra), "teacher": stage.teacher,
            "max_steps": stage.max_steps or preset(stage)["trainer"]["max_steps"],
            "date": time.strftime("%Y-%m-%d"), "machine": machine(), "num_samples": args.num_samples,
            "points": points, "stage_wall_s": round(time.time() - started)}


def evaluations(done: dict) -> list[tuple[str, dict, tuple]]:
    """(stage, point, samplers) to score: the cheap one- and two-step ones first, the Heun teacher last."""
    cheap, costly = [], []
    for name, record in done.items():
        stage = STAGES[name]
        for i, point in enumerate(record["points"]):
            if stage.samplers:
                cheap.append((name, point, stage.samplers))
            if stage.final_samplers and i == len(record["points"]) - 1:
                costly.append((name, point, stage.final_samplers))
    return cheap + costly


def plot(stages: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"ict": "tab:blue", "ct": "tab:red", "edm": "black", "cd": "tab:green", "ect": "tab:purple",
              "edm_short": "tab:gray", "ect_short": "tab:pink"}
    styles = {"fid_1step": ("-o", "1 step"), "fid_2step": ("--s", "2 steps"), "fid_heun18": ("*", "Heun 18, 35 evaluations"),
              "fid_heun10": ("*", "Heun 10, 19 evaluations")}
    fig, ax = plt.subplots(figsize=(10.5, 4.6))
    for name, stage in stages.items():
        for key, (style, what) in styles.items():
            points = [p for p in stage["points"] if key in p]
            if points:
                ax.plot([p["total_s"] / 60 for p in points], [p[key] for p in points], style,
                        color=colors.get(name), markersize=12 if key.startswith("fid_heun") else 6,
                        label=f"{stage['label']}, {what}")
    ax.set_xlabel("training minutes on this 2-core CPU (CD, ECT: the teacher's included)")
    ax.set_ylabel("FID (MNIST classifier features, 10k vs test)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))  # outside: the points fill the axes
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), metavar="STAGE")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--points", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=10000)
    parser.add_argument("--max-steps", type=int, default=None, help="cap on each preset's steps (a smoke run)")
    parser.add_argument("--results-dir", default=str(RESULTS))
    parser.add_argument("--work-dir", default=str(ROOT / "runs" / "quality_mnist"))
    parser.add_argument("--score-only", action="store_true",
                        help="train nothing: score the checkpoints recorded in the results file that lack a score")
    args = parser.parse_args()
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; accepted: {list(STAGES)}")
    missing = [f"{s} needs {STAGES[s].teacher}" for s in args.stages if STAGES[s].teacher and STAGES[s].teacher not in args.stages]
    if missing and not args.score_only:
        parser.error("a distilled stage trains from its teacher in the same run: " + "; ".join(missing))
    if args.points < 1 or args.num_samples < 2:
        parser.error(f"--points must be >= 1 (got {args.points}) and --num-samples >= 2 (got {args.num_samples})")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    previous = results / "quality_mnist.json"
    stages = json.loads(previous.read_text()).get("stages", {}) if previous.exists() else {}
    done = {}

    def write() -> None:  # after every stage and score: what is finished survives a later failure
        text = json.dumps({"stages": {**stages, **done}}, indent=2) + "\n"
        previous.write_text(text.replace(f'"{ROOT}/', '"'))  # checkpoint paths relative to the repository

    if args.score_only:
        absent = [s for s in args.stages if s not in stages]
        if absent:
            parser.error(f"--score-only: no record of stage(s) {absent} in {previous}; recorded: {list(stages)}")
        done = {name: stages[name] for name in args.stages}
    else:
        for name in sorted(args.stages, key=list(STAGES).index):  # teachers first; all training, then all scoring
            done[name] = train_stage(name, args, work, done)
            write()
    for name, point, samplers in evaluations(done):
        samplers = tuple(s for s in samplers if fid_key(s) not in point)
        if not samplers:  # scored by an earlier, interrupted run of this script
            continue
        point.update(evaluate(name, point["path"], samplers, args))
        print(name, point, flush=True)
        write()
    stages.update(done)
    plot({k: stages[k] for k in STAGES if k in stages}, results / "quality_mnist.png")
    print(f"written to {previous}")


if __name__ == "__main__":
    main()

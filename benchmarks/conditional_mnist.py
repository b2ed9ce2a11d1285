"""Class-conditional MNIST in one run: the guided teacher and its students, class accuracy beside FID, and what
classifier-free guidance does.

    python benchmarks/conditional_mnist.py                       # train what is missing, then score
    python benchmarks/conditional_mnist.py --table               # the README's table
    python benchmarks/conditional_mnist.py --grids               # one row per digit, per stage

Trained on this machine as a user's ``fit`` would (validation off): the teacher ``configs/mnist_edm_cond.yaml``
(label dropout 0.1) with EDM's σ law (P_mean −1.2, P_std 1.2, the preset's before this run) and a CD student per
guidance scale w from it (``configs/mnist_cd_cond.yaml --model.guidance_scale w``: the teacher's ODE step is the
guided one); then the preset's teacher (EDM2's σ law, P_mean −0.8, P_std 1.6), the CD student at w = 2 from it,
and ECT from its weights (``configs/mnist_ect_cond.yaml``). ``--stages`` picks stages. Per teacher, a probe of where
its label acts (``label_use``).
Scored on class-balanced samples (image i of class i mod 10) against the 10,000 MNIST test images, in the two
feature spaces of ``ablation_mnist.py`` (the shipped classifier's and ``feature_net.py``'s), with the shipped
classifier's class accuracy and the probability it gives the asked class: the teacher at Heun 10 without guidance
and each student (one per w) at one and two steps with ``--num-samples``; the teacher at each w with
``--guidance-samples``. Each stage is scored as soon as it is trained; ``results/conditional_mnist.json`` is
written after every stage and score; training minutes are wall (and process CPU) minutes.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from torchvision.utils import save_image

from ablation_mnist import TwoSpaces, key_of, sampler_of
from common import ROOT, machine
from quality_mnist import DEFAULT2, EDM2_LAW, EDM_LAW, HEUN10, ONE_STEP, Stage, module_class, train
from callbacks import SampleGrid
from cm_lightning.io.files import atomic_write
from cm_lightning.nets.mnist_classifier import MNISTClassifier, mnist_tensors

RESULTS = ROOT / "benchmarks" / "results" / "conditional_mnist.json"
GUIDANCE = (1.0, 1.5, 2.0, 3.0)
PROBE_SIGMAS = (80.0, 20.0, 10.0, 5.0, 3.0, 2.0, 1.0)


def stages(guidance: list[float]) -> dict[str, Stage]:
    """Stage name → what it trains, in the run's order; each student starts from its ``teacher`` stage."""
    # EDM's σ law, the preset's until this run measured EDM2's
    out = {"edm": Stage("mnist_edm_cond.yaml", (), extra=EDM_LAW, label="conditional EDM teacher, EDM's σ law")}
    for w in guidance:
        out[f"cd_w{w:g}"] = Stage("mnist_cd_cond.yaml", (), extra=(f"--model.guidance_scale={w}",), teacher="edm",
                                  label=f"CD from the teacher guided at w = {w:g}")
    out["edm_p0.8"] = Stage("mnist_edm_cond.yaml", (), extra=EDM2_LAW,
                            label="conditional EDM teacher, EDM2's σ law (the preset)")
    out["cd_w2_p0.8"] = Stage("mnist_cd_cond.yaml", (), extra=("--model.guidance_scale=2",), teacher="edm_p0.8",
                              label="CD from the EDM2-σ-law teacher guided at w = 2")
    out["ect"] = Stage("mnist_ect_cond.yaml", (), teacher="edm_p0.8", teacher_arg="--model.init_from",
                       label="ECT from the EDM2-σ-law teacher")
    return out


def load(record: dict, stage: Stage):
    return module_class(stage).load_from_checkpoint(ROOT / record["points"][-1]["path"], map_location="cpu",
                                                    weights_only=True).eval()


def score(name: str, record: dict, stage: Stage, scorer: TwoSpaces, args, write) -> None:
    """Every score of one stage that its record lacks, each written as soon as it is done."""
    module, scores = load(record, stage), record.setdefault("scores", {})
    if not stage.teacher:  # a teacher: the plain conditional one, then the guidance sweep
        plan = [(f"{HEUN10}_w1", HEUN10, 1.0, args.num_samples)]
        plan += [(f"{HEUN10}_w{w:g}_sweep", HEUN10, w, args.guidance_samples) for w in args.guidance]
    else:
        plan = [(key_of(module, s), sampler_of(module, s), None, args.num_samples) for s in (ONE_STEP, DEFAULT2)]
    for key, sampler, w, count in plan:
        if key in scores:
            continue
        if w is not None:
            module.hparams.guidance_scale = w
        started = time.time()
        scores[key] = {**scorer(module, sampler, count), "samples": count, "guidance_scale": w}
        print(f"{name} {key}: {scores[key]} ({time.time() - started:.0f} s)", flush=True)
        write()


@torch.no_grad()
def label_use(module, data_dir: str, count: int = 1000) -> dict[str, dict[str, float]]:
    """Where a teacher's label acts, per σ: the shipped classifier's accuracy on D(x + σ n, c) for ``count`` MNIST
    test images x of class c (conditional), on D(x + σ n, ∅) (no label), and how often D(x + σ n, c + 1 mod 10),
    the wrong label, is read as that wrong label. At large σ the ideal D(·, c) is the class mean, which the
    classifier reads right for every digit; the wrong label winning at small σ would mean the image is ignored."""
    images, labels = mnist_tensors(data_dir, train=False)
    generator = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(images), generator=generator)[:count]
    x0, c = images[pick], labels[pick]
    wrong, none = (c + 1) % 10, torch.full_like(c, -1)
    classifier, denoiser = MNISTClassifier.pretrained(), module.network(module.hparams.eval_weights)
    read = lambda d: torch.cat([classifier.logits(chunk).argmax(1) for chunk in d.split(500)])
    out = {}
    for sigma in PROBE_SIGMAS:
        x = x0 + sigma * torch.randn(x0.shape, generator=generator)
        s = torch.full((count,), sigma)
        out[f"{sigma:g}"] = {"acc_label": (read(denoiser(x, s, c)) == c).float().mean().item(),
                             "acc_no_label": (read(denoiser(x, s, none)) == c).float().mean().item(),
                             "wrong_label_wins": (read(denoiser(x, s, wrong)) == wrong).float().mean().item()}
    return out


def label_table(data: dict) -> str:
    """Per teacher and σ: accuracy of D(x_σ, c) / D(x_σ, ∅), and the share the wrong label wins."""
    teachers = {name: r["label_by_sigma"] for name, r in data["stages"].items() if "label_by_sigma" in r}
    if not teachers:
        return ""
    lines = ["| teacher | " + " | ".join(f"σ = {s:g}" for s in PROBE_SIGMAS) + " |", "|---" * (len(PROBE_SIGMAS) + 1) + "|"]
    for name, probe in teachers.items():
        cells = [f"{p['acc_label']:.0%} / {p['acc_no_label']:.0%} / {p['wrong_label_wins']:.0%}" for p in probe.values()]
        lines.append(f"| {data['stages'][name]['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(data: dict, all_stages: dict) -> str:
    lines = ["| stage | sampler | samples | FID `mnist` | FID `net_b` | class accuracy | confidence | training min (CPU min): own / with the teacher's |",
             "|---|---|---|---|---|---|---|---|"]
    for name, record in data["stages"].items():
        if not record["points"]:
            continue
        point = record["points"][-1]
        teacher = all_stages[name].teacher
        below = data["stages"][teacher]["points"][-1] if teacher else {"train_s": 0, "train_cpu_s": 0}
        minutes = (f"{point['train_s'] / 60:.1f} ({point['train_cpu_s'] / 60:.1f}) / {(point['train_s'] + below['train_s']) / 60:.1f} "
                   f"({(point['train_cpu_s'] + below['train_cpu_s']) / 60:.1f})")
        for key, s in record.get("scores", {}).items():
            sampler = key.removesuffix("_sweep").replace("sigmas_", "σ ").replace("_", ", ")
            lines.append(f"| {record['label']} | {sampler} | {s['samples']:,} | {s['mnist']:.1f} | {s['net_b']:.2f} | "
                         f"{s['class_acc']:.1%} | {s['class_confidence']:.3f} | {minutes} |")
    return "\n".join(lines)


def grids(data: dict, all_stages: dict, folder: Path) -> None:
    """Ten samples of each digit, one row per digit (seed 0): the teacher at Heun 10 (w = 1 and the largest w) and
    every student at one step, as ``conditional_mnist_<stage>_<sampler>.png``."""
    for name, record in data["stages"].items():
        if not (record["points"] and (ROOT / record["points"][-1]["path"]).exists()):
            continue
        module = load(record, all_stages[name])
        plans = [("heun10_w1", HEUN10, 1.0), (f"heun10_w{max(data['guidance']):g}", HEUN10, max(data["guidance"]))] \
            if not all_stages[name].teacher else [("1step", list(ONE_STEP), None)]
        for tag, sampler, w in plans:
            if w is not None:
                module.hparams.guidance_scale = w
            images, per_row = SampleGrid(num_samples=100)._images(module, sampler)
            path = folder / f"conditional_mnist_{name}_{tag}.png"
            save_image(images, path, nrow=per_row, normalize=True, value_range=(-1, 1))
            print(path, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--guidance", type=float, nargs="+", default=list(GUIDANCE))
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--num-samples", type=int, default=10000)
    parser.add_argument("--guidance-samples", type=int, default=2000)
    parser.add_argument("--max-steps", type=int, default=None, help="cap on each preset's steps (a smoke run)")
    parser.add_argument("--work-dir", default=str(ROOT / "runs" / "conditional_mnist"))
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--stages", nargs="+", default=None, metavar="STAGE",
                        help="train and score only these, in this order (default: all, the teacher first)")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--table", action="store_true", help="print the results' table (markdown) and stop")
    parser.add_argument("--grids", action="store_true", help="write the grids of every trained stage and stop")
    args = parser.parse_args()
    results, work = Path(args.results), Path(args.work_dir)
    data = json.loads(results.read_text()) if results.exists() else {"stages": {}, "guidance": args.guidance}
    all_stages = stages(data["guidance"])
    if args.table:
        return print(table(data, all_stages), label_table(data), sep="\n\n")
    if args.grids:
        return grids(data, all_stages, results.parent)
    bad = [name for name in args.stages or () if name not in all_stages]
    if bad:
        parser.error(f"unknown stage(s) {bad}: choose from {list(all_stages)}")
    if data["guidance"] != args.guidance:
        parser.error(f"{results} sweeps guidance {data['guidance']}: pass the same --guidance, or another --results")
    if any(r["machine"] != machine() for r in data["stages"].values()):
        parser.error(f"{results} was trained on another machine: a one-run comparison trains on one; pass --results")
    work.mkdir(parents=True, exist_ok=True)
    args.points = 1

    def write() -> None:
        text = (json.dumps(data, indent=2) + "\n").replace(f'"{ROOT}/', '"')
        atomic_write(results, lambda tmp: tmp.write_text(text))

    scorer = None if args.train_only else TwoSpaces(args.data_dir, torch.device("cpu"))
    for name in args.stages or all_stages:  # the teacher first; each stage scored once trained, so a cut run keeps both
        stage = all_stages[name]
        record = data["stages"].get(name)
        if not (record and record["points"] and (ROOT / record["points"][-1]["path"]).exists()):
            if stage.teacher and stage.teacher not in data["stages"]:
                raise SystemExit(f"{name} starts from the teacher {stage.teacher!r}: train it first (--stages {stage.teacher} {name})")
            teacher = str(ROOT / data["stages"][stage.teacher]["points"][-1]["path"]) if stage.teacher else None
            started = time.time()
            points = train(name, args, work, teacher, stage)
            data["stages"][name] = {"label": stage.label, "args": list(stage.extra), "date": time.strftime("%Y-%m-%d"),
                                    "machine": machine(), "points": points, "stage_wall_s": round(time.time() - started)}
            write()
        if scorer is not None:
            score(name, data["stages"][name], stage, scorer, args, write)
            if not stage.teacher and "label_by_sigma" not in data["stages"][name]:
                data["stages"][name]["label_by_sigma"] = label_use(load(data["stages"][name], stage), args.data_dir)
                write()
    if args.train_only:
        return
    print(table(data, all_stages))
    print(f"written to {results}")


if __name__ == "__main__":
    main()

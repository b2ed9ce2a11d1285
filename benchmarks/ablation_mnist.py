"""Which choices bring a student to its teacher: the teacher and its CD and ECT students per choice, in one run,
scored in two feature spaces.

    python benchmarks/ablation_mnist.py --arms fourier16 fourier0.02 positional_edm --stages edm
    python benchmarks/ablation_mnist.py --arms fourier0.02 --stages edm cd ect    # students of a trained arm
    python benchmarks/ablation_mnist.py --score-only                             # finish an interrupted scoring

An *arm* is a set of arguments given to the teacher and to its students alike (the network must match): the
noise embedding (DESIGN §2.7), σ_data, …; ``fourier16`` is the presets as they were before the teacher took
EDM2's σ law (``sigma_law_edm2``, the ``mnist_edm`` preset's since; ``EDM_LAW_ARMS`` keep EDM's). Per arm,
``edm`` trains the ``mnist_edm`` teacher, ``cd`` distils it (``mnist_cd``) and ``ect`` tunes it (``mnist_ect``), ``ict`` trains the
quick-start from scratch (the comparison a teacher path must beat), ``sct`` and ``scd`` the continuous-time
students (``mnist_sct`` from the teacher's weights, ``mnist_scd`` from its velocity), each at its preset's
length with the ``PostHocEMA`` callback on, as a user's ``fit`` would; ``edm_short`` and ``ect_short`` are the
budget table's ~15-minute path (the teacher for 1,500 steps, ECT for 1,000 from it). A stage already trained in an earlier run
(its record and checkpoint exist) is not trained again, so arms and stages can be added run after run; training
times are recorded per stage (a student's total includes its teacher's).

Scoring (after all training): every FID is computed on the same generated images in two feature spaces, the shipped
classifier's (``mnist``) and the independent ``benchmarks/feature_net.py`` network's (``net_b``), ``--num-samples``
images against the 10,000 MNIST test images. The teacher: Heun 10 (19 evaluations) with its preset's weights; then
the post-hoc EMA sweep (Heun 5, ``--sweep-samples`` images per σ_rel, classifier features) and the best σ_rel at
Heun 10 with ``--num-samples``. Students: one step and their two-step default (CD: on its trained grid; ECT:
[80, 0.8]), the two-step level found by ternary search (on the trained grid for CD, on the 40-level Karras grid
otherwise; ``--sweep-samples`` per candidate, classifier features) scored with ``--num-samples``, and the post-hoc
EMA sweep for one and two steps with each best σ_rel scored likewise. Results: ``results/ablation_mnist.json``,
written after every stage and every score.
"""

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

from common import ROOT, machine
from feature_net import load as load_feature_net
from ablation_stages import ARMS, STAGE_PRESETS, VARIANTS, arm_args, base_of, stage_of, teacher_of
from quality_mnist import DEFAULT2, HEUN10, ONE_STEP, Stage, module_class, train
from callbacks import PostHocEMA
from callbacks.fid import Scores
from cm_lightning.io.files import atomic_write
from cm_lightning.io.post_hoc_ema import evaluation_checkpoint, reconstruct
from cm_lightning.nets.mnist_classifier import MNISTClassifier, mnist_tensors
from cm_lightning.sampling.schedule_search import search_schedule

RESULTS = ROOT / "benchmarks" / "results" / "ablation_mnist.json"


def teacher_path(arm: str, stage: str, data: dict, work: Path) -> Path:
    """The teacher file a student stage starts from: the teacher's final checkpoint, or for ``*_phema`` stages
    that checkpoint with the teacher's best σ_rel reconstructed in its evaluation weights (written once)."""
    teacher = data["stages"][f"{arm}_{teacher_of(stage)}"]
    final = ROOT / teacher["points"][-1]["path"]
    if not stage.endswith("_phema"):
        return final
    if "phema_best" not in teacher:
        raise SystemExit(f"{stage} starts from {arm}_edm's best post-hoc EMA: score {arm}_edm first (without --skip-phema)")
    sigma_rel = teacher["phema_best"]["sigma_rel"]
    path = work / f"{arm}_edm" / f"phema_{sigma_rel:.3f}.ckpt"
    if not path.exists():
        (result,) = reconstruct(ROOT / teacher["phema_folder"], [sigma_rel])
        checkpoint = evaluation_checkpoint(torch.load(final, map_location="cpu", weights_only=True), result)
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))
    return path
SIGMA_RELS = (0.05, 0.1, 0.15, 0.2)
SCORE_KEYS = ("fid", "searched2", "one_step_from")  # with the ``phema_*`` keys: what a stage's scores are


def weights_digest(path: Path) -> str:
    """SHA-256 of a checkpoint's ``state_dict`` (names and bytes): training here is deterministic (same seed, same
    commands), so a stage retrained in a fresh work folder that reproduces this digest keeps its earlier scores."""
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class TwoSpaces:
    """FID of generated images against the MNIST test set in two feature spaces, from one generation pass."""

    def __init__(self, data_dir: str, device: torch.device):
        nets = {"mnist": MNISTClassifier.pretrained(), "net_b": load_feature_net()}
        self.scores = {k: Scores(n.to(device), n.num_features, kid=False).to(device) for k, n in nets.items()}
        real, _ = mnist_tensors(data_dir, train=False)
        for batch in real.split(500):
            for s in self.scores.values():
                s.update(batch.to(device), real=True)

    @torch.no_grad()
    def __call__(self, module, sampler, num_samples: int, spaces: tuple = ("mnist", "net_b")) -> dict[str, float]:
        """{space: FID}; for a class-conditional model (class-balanced samples) also the shipped classifier's
        ``class_acc`` and ``class_confidence`` when ``mnist`` is among the spaces."""
        used = {k: self.scores[k] for k in spaces}
        for s in used.values():
            s.reset()
        for start in range(0, num_samples, 500):
            count = min(500, num_samples - start)
            x = module.sample(count, sampler, seed=0, first_index=start)
            labels = module.sampling_labels(None, range(start, start + count))  # None for an unconditional model
            for s in used.values():
                s.update(x, real=False, labels=labels)
        out = {}
        for k, s in used.items():
            computed = s.compute()
            out[k] = round(computed["fid"].item(), 2)
            out |= {key: round(computed[key].item(), 4) for key in ("class_acc", "class_confidence") if key in computed}
        return out


def sampler_of(module, sampler):
    """``default2``: the model's own two-step schedule (CD: its trained level nearest 0.8)."""
    if sampler == DEFAULT2:
        return next(s for s in module.eval_samplers if not isinstance(s, str) and len(s) == 2)
    return list(sampler) if isinstance(sampler, tuple) else sampler


def key_of(module, sampler) -> str:
    resolved = sampler_of(module, sampler)
    return resolved if isinstance(resolved, str) else "sigmas_" + "_".join(f"{s:.4g}" for s in resolved)


# post-hoc EMA per stage: (sampler the σ_rel sweep scores, sampler the best σ_rel is then scored with, record key)
PHEMA = {"edm": (("heun5", HEUN10, "phema_best"),),
         "student": ((ONE_STEP, ONE_STEP, "phema_best_1step"), (DEFAULT2, DEFAULT2, "phema_best_2step"))}


def score_stage(name: str, record: dict, stage: str, scorer: TwoSpaces, args, write) -> None:
    """Every score of one trained stage that the record lacks, written as each is finished."""
    point = record["points"][-1]
    scores = record.setdefault("fid", {})
    base = base_of(stage)[0]
    cls = module_class(Stage(STAGE_PRESETS[base][0], ()))
    module = cls.load_from_checkpoint(ROOT / point["path"], map_location="cpu", weights_only=True).eval()
    for sampler in STAGE_PRESETS[base][1]:
        key = key_of(module, sampler)
        if key not in scores:
            started = time.time()
            scores[key] = scorer(module, sampler_of(module, sampler), args.num_samples)
            print(f"{name} {key}: {scores[key]} ({time.time() - started:.0f} s)", flush=True)
            write()
    if base != "edm" and "searched2" not in record and not args.skip_search:  # the two-step level by ternary search
        trials = {}

        def trial(schedule: list[float]) -> float:
            trials["_".join(f"{s:.4g}" for s in schedule)] = fid = scorer(module, schedule, args.sweep_samples, ("mnist",))["mnist"]
            return fid

        schedule, _, _ = search_schedule(trial, steps=2, grid=module.training_levels())
        record["searched2"] = {"schedule": schedule, "candidates": trials,
                               "fid": scorer(module, schedule, args.num_samples)}
        print(f"{name} searched two-step schedule: {record['searched2']}", flush=True)
        write()
    if base != "edm" and args.start_levels:  # one step from a lower σ: how well the model learned each level
        levels = record.setdefault("one_step_from", {})
        for sigma in args.start_levels:
            if f"{sigma:g}" not in levels:
                levels[f"{sigma:g}"] = scorer(module, [sigma], args.sweep_samples, ("mnist",))["mnist"]
                print(f"{name} one step from σ {sigma:g}: {levels[f'{sigma:g}']}", flush=True)
                write()
    if not args.skip_phema:
        post_hoc_ema(name, record, module, PHEMA["edm" if base == "edm" else "student"], scorer, args, write)


def post_hoc_ema(name: str, record: dict, module, plan: tuple, scorer: TwoSpaces, args, write) -> None:
    """The σ_rel sweep (classifier features, ``--sweep-samples``) per sampler, then the best σ_rel in both spaces."""
    network = module.network(module.hparams.eval_weights)
    kept = {k: v.clone() for k, v in network.state_dict().items()}
    folder = ROOT / record["phema_folder"]
    for sweep_sampler, final_sampler, best_key in plan:
        sweep = record.setdefault(f"phema_sweep_{key_of(module, sweep_sampler)}", {})
        for result in reconstruct(folder, [s for s in args.sigma_rels if f"{s:g}" not in sweep]):
            network.load_state_dict(result.state_dict)
            sweep[f"{result.sigma_rel:g}"] = scorer(module, sampler_of(module, sweep_sampler), args.sweep_samples,
                                                    spaces=("mnist",))["mnist"]
            print(f"{name} post-hoc EMA σ_rel {result.sigma_rel:g}: {sweep_sampler} FID {sweep[f'{result.sigma_rel:g}']}",
                  flush=True)
            write()
        best = min(sweep, key=sweep.get)
        if record.get(best_key, {}).get("sigma_rel") != float(best):
            (result,) = reconstruct(folder, [float(best)])
            network.load_state_dict(result.state_dict)
            final = key_of(module, final_sampler)
            record[best_key] = {"sigma_rel": float(best),
                                final: scorer(module, sampler_of(module, final_sampler), args.num_samples)}
            print(f"{name} best σ_rel {best}: {record[best_key]}", flush=True)
            write()
    network.load_state_dict(kept)


def rows_of(record: dict) -> list[tuple[str, dict]]:
    """(what was sampled, {space: FID}) for every score of a stage."""
    rows = [(key.replace("sigmas_", "σ ").replace("_", ", "), fid) for key, fid in record.get("fid", {}).items()]
    if "searched2" in record:
        rows.append((f"σ {', '.join(f'{s:.4g}' for s in record['searched2']['schedule'])} (searched)",
                     record["searched2"]["fid"]))
    for key in ("phema_best", "phema_best_1step", "phema_best_2step"):
        if key in record:
            best = dict(record[key])
            sigma_rel = best.pop("sigma_rel")
            ((sampler, fid),) = best.items()
            rows.append((f"{sampler.replace('sigmas_', 'σ ').replace('_', ', ')}, post-hoc EMA σ_rel {sigma_rel:g}", fid))
    return rows


def table(data: dict) -> str:
    """The README's table: every score with its training minutes and its ratio to its own teacher's best Heun."""
    lines = ["| arm | stage | sampler (weights) | FID `mnist` | FID `net_b` | ÷ teacher's best (`mnist` / `net_b`) | "
             "training min (CPU min): own / with the teacher's |", "|---|---|---|---|---|---|---|"]
    stages = data["stages"]
    for name, record in stages.items():
        teacher = stages.get(record["teacher"] or "", record if base_of(record["stage"])[0] == "edm" else None)
        scored = rows_of(teacher) if teacher else []
        best = {space: min(fid[space] for _, fid in scored) for space in ("mnist", "net_b")} if scored else None
        point = record["points"][-1]
        below = teacher["points"][-1] if record["teacher"] and teacher else {"train_s": 0.0, "train_cpu_s": 0.0}
        minutes = (f"{point['train_s'] / 60:.1f} ({point['train_cpu_s'] / 60:.1f}) / "  # the teacher's current times:
                   f"{(point['train_s'] + below['train_s']) / 60:.1f} "  # a teacher re-timed alone updates its students
                   f"({(point['train_cpu_s'] + below['train_cpu_s']) / 60:.1f})")
        for sampler, fid in rows_of(record):
            ratio = f"{fid['mnist'] / best['mnist']:.2f} / {fid['net_b'] / best['net_b']:.2f}" if best else "–"
            lines.append(f"| {record['arm']} | {record['stage']} | {sampler} | {fid['mnist']:.1f} | {fid['net_b']:.2f} | "
                         f"{ratio} | {minutes} |")
    return "\n".join(lines)


def save_grids(data: dict, folder: Path) -> None:
    """64 samples (seed 0) of every stage whose checkpoint is here: the teacher's Heun 10, a student's one step and
    its best two-step schedule, as ``ablation_mnist_<arm>_<stage>_<sampler>.png``."""
    from torchvision.utils import save_image
    for name, record in data["stages"].items():
        path = ROOT / record["points"][-1]["path"]
        if not path.exists():
            continue
        base = base_of(record["stage"])[0]
        module = module_class(Stage(STAGE_PRESETS[base][0], ())).load_from_checkpoint(path, map_location="cpu",
                                                                                      weights_only=True).eval()
        samplers = {"heun10": HEUN10} if base == "edm" else {
            "1step": ONE_STEP, "2step": record.get("searched2", {}).get("schedule") or DEFAULT2}
        for tag, sampler in samplers.items():
            with torch.no_grad():
                x = module.sample(64, sampler_of(module, sampler), seed=0)
            save_image(x, folder / f"ablation_mnist_{name}_{tag}.png", nrow=8, normalize=True, value_range=(-1, 1))
            print(f"{name} {tag}: {folder / f'ablation_mnist_{name}_{tag}.png'}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=["fourier16"], metavar="ARM", help=f"of {list(ARMS)}")
    parser.add_argument("--stages", nargs="+", default=["edm"], metavar="STAGE",
                        help=f"of {list(STAGE_PRESETS) + list(VARIANTS)}")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--num-samples", type=int, default=10000)
    parser.add_argument("--sweep-samples", type=int, default=2000)
    parser.add_argument("--sigma-rels", type=float, nargs="+", default=list(SIGMA_RELS))
    parser.add_argument("--skip-phema", action="store_true", help="no post-hoc EMA sweep")
    parser.add_argument("--skip-search", action="store_true", help="no two-step level search (later: --score-only)")
    parser.add_argument("--skip-teachers", action="store_true",
                        help="score no teacher (Heun 10 is the costly score; later: --score-only)")
    parser.add_argument("--start-levels", type=float, nargs="*", default=[], metavar="SIGMA",
                        help="students: also one step from each of these σ (--sweep-samples images, classifier features)")
    parser.add_argument("--max-steps", type=int, default=None, help="cap on each preset's steps (a smoke run)")
    parser.add_argument("--work-dir", default=str(ROOT / "runs" / "ablation_mnist"))
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--score-only", action="store_true", help="train nothing; score what the results file lists")
    parser.add_argument("--table", action="store_true", help="print the results file's table (markdown) and stop")
    parser.add_argument("--grids", action="store_true", help="write every trained stage's sample grids and stop")
    args = parser.parse_args()
    if args.table:
        return print(table(json.loads(Path(args.results).read_text())))
    if args.grids:
        return save_grids(json.loads(Path(args.results).read_text()), Path(args.results).parent)
    args.points = 1
    stages = list(STAGE_PRESETS) + list(VARIANTS)
    bad = [a for a in args.arms if a not in ARMS] + [s for s in args.stages if s not in stages]
    if bad:
        parser.error(f"unknown arm(s) or stage(s) {bad}: arms {list(ARMS)}, stages {stages}")
    results, work = Path(args.results), Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data = json.loads(results.read_text()) if results.exists() else {"stages": {}}
    elsewhere = sorted({r["machine"] for r in data["stages"].values()} - {machine()})
    if elsewhere and not args.score_only:  # the same commands give other weights on another CPU's kernels
        parser.error(f"{results} holds stages trained on {elsewhere}, this machine is {machine()!r}: a one-run "
                     "comparison trains on one machine, so pass --results with a new file for this one")

    def write() -> None:  # atomically: a run stopped at any moment leaves the last complete results
        results.parent.mkdir(parents=True, exist_ok=True)
        text = (json.dumps(data, indent=2) + "\n").replace(f'"{ROOT}/', '"')
        atomic_write(results, lambda tmp: tmp.write_text(text))

    todo = [(arm, stage) for arm in args.arms for stage in stages if stage in args.stages]  # teachers first
    if not args.score_only:
        for arm, stage in todo:
            name = f"{arm}_{stage}"
            record = data["stages"].get(name)
            if record and Path(ROOT / record["points"][-1]["path"]).exists():
                continue  # trained by an earlier run
            needs_teacher = STAGE_PRESETS[base_of(stage)[0]][2] is not None
            teacher = data["stages"].get(f"{arm}_{teacher_of(stage)}") if needs_teacher else None
            if needs_teacher and teacher is None:
                parser.error(f"{name} needs its teacher: add {teacher_of(stage)} to --stages (or train "
                             f"{arm}_{teacher_of(stage)} first)")
            phema = work / name / "post_hoc_ema"
            if phema.exists():  # an interrupted earlier attempt: its snapshots belong to no recorded run
                for old in phema.glob("phema-*.pt"):
                    old.unlink()
            started = time.time()
            source = teacher and str(teacher_path(arm, stage, data, work))
            points = train(name, args, work, source, stage_of(arm, stage), callbacks=(PostHocEMA(folder=str(phema)),))
            digest = weights_digest(ROOT / points[-1]["path"])
            kept = {k: v for k, v in (record or {}).items() if k in SCORE_KEYS or k.startswith("phema_")
                    and k != "phema_folder"} if record and record.get("weights_sha256") == digest else {}
            if kept:  # the same computation timed twice: the faster run had less beside it, its times stand
                print(f"{name}: the same weights as the recorded run ({digest[:12]}), its scores are kept", flush=True)
                if record["points"][-1]["train_s"] < points[-1]["train_s"]:
                    points, started = record["points"], time.time() - record["stage_wall_s"]
            data["stages"][name] = {"arm": arm, "stage": stage, "args": list(arm_args(arm, base_of(stage)[0])),
                                    "teacher": f"{arm}_{teacher_of(stage)}" if teacher else None, "teacher_file": source,
                                    "date": time.strftime("%Y-%m-%d"), "machine": machine(), "points": points,
                                    "phema_folder": str(phema), "num_samples": args.num_samples,
                                    "stage_wall_s": round(time.time() - started), "weights_sha256": digest, **kept}
            write()
    scorer = TwoSpaces(args.data_dir, torch.device("cpu"))
    for arm, stage in todo:
        if f"{arm}_{stage}" in data["stages"] and not (args.skip_teachers and base_of(stage)[0] == "edm"):
            score_stage(f"{arm}_{stage}", data["stages"][f"{arm}_{stage}"], stage, scorer, args, write)
    print(f"written to {results}")


if __name__ == "__main__":
    main()

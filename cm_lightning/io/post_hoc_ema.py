"""Post-hoc EMA snapshots on disk, and a checkpoint for any σ_rel reconstructed from them (EDM2 Algorithm 3).

    python -m cm_lightning.io.post_hoc_ema runs/lightning_logs/version_0/checkpoints/last.ckpt \\
        --sigma-rel 0.05 0.1 0.15 --out runs/phema

The ``callbacks.PostHocEMA`` callback writes one file per snapshot, ``phema-<step>.pt``, holding the step, the
tracked σ_rel and γ, and one state dict of the network per tracked average. The command reads the snapshot folder
that the checkpoint's callback state names (or ``--snapshots``), solves the least-squares weights of the snapshots
for each σ_rel at the last snapshot's step (or ``--step``), and writes ``<out>/phema_<σ_rel>.ckpt``: the checkpoint
with the reconstructed network in the weights it evaluates with (its ``eval_weights``, or ``--weights``), for
``cm-lightning test`` / ``predict`` / ``load_from_checkpoint``. Those files are for evaluation: they hold no
optimizer or loop state, so ``fit --ckpt_path`` refuses them. Snapshot files are never modified.
"""

import argparse
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from cm_lightning.core.ema import weights_keys
from cm_lightning.core.post_hoc_ema import combine, sigma_rel_to_gamma, solve_coefficients
from cm_lightning.io.files import atomic_write

SNAPSHOT = re.compile(r"phema-(\d+)\.pt")
FORMAT = 1
# the name Lightning keeps the callback's state under in a checkpoint's "callbacks" (its ``state_key``)
CALLBACK_STATE = "PostHocEMA"


def snapshot_path(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"phema-{step:09d}.pt"


def snapshot_steps(folder: str | Path) -> list[int]:
    """The steps of the complete snapshot files in ``folder``, ascending (temporary files are not snapshots)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := SNAPSHOT.fullmatch(p.name)))


def write_snapshot(folder: str | Path, step: int, sigma_rels: Sequence[float], gammas: Sequence[float],
                   networks: Sequence[dict[str, Tensor]]) -> Path:
    """One snapshot, written atomically (a killed run leaves it complete or absent), tensors on the CPU."""
    path = snapshot_path(folder, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {"format": FORMAT, "step": step, "sigma_rels": list(sigma_rels), "gammas": list(gammas),
               "networks": [{k: v.detach().cpu() for k, v in n.items()} for n in networks]}
    atomic_write(path, lambda tmp: torch.save(content, tmp))
    return path


def read_snapshot(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


@dataclass(frozen=True)
class Reconstruction:
    sigma_rel: float
    step: int
    state_dict: dict[str, Tensor]  # the network's (``module.online``'s) state dict
    snapshot_steps: list[int]
    coefficients: list[float]  # one per (snapshot, tracked average), snapshot-major


def reconstruct(folder: str | Path, sigma_rels: Sequence[float], step: int | None = None) -> Iterator[Reconstruction]:
    """The network averaged with each of ``sigma_rels`` as if its EMA had been tracked to ``step`` (default: the
    last snapshot's), from the snapshots in ``folder`` up to that step; one reconstruction at a time."""
    gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]  # refuses a bad σ_rel before any reading
    steps = snapshot_steps(folder)
    if not steps:
        raise FileNotFoundError(f"no post-hoc EMA snapshots (phema-<step>.pt) in {folder}: train with the "
                                "callbacks.PostHocEMA callback, or pass the folder it wrote")
    step = steps[-1] if step is None else step
    used = [s for s in steps if s <= step]
    if not used or step > steps[-1]:
        raise ValueError(f"step {step} is outside the snapshots' steps {steps[0]}…{steps[-1]} in {folder}")
    profiles = [(s, g) for s in used for g in read_snapshot(snapshot_path(folder, s))["gammas"]]
    for sigma_rel, gamma in zip(sigma_rels, gammas):
        x = solve_coefficients([s for s, _ in profiles], [g for _, g in profiles], step, gamma)
        yield Reconstruction(sigma_rel, step, combine(_weighted(folder, used, x.tolist())), used, x.tolist())


def _weighted(folder: str | Path, steps: list[int], coefficients: list[float]) -> Iterator[tuple[float, dict]]:
    """(coefficient, network) pairs in the order of the profiles, reading one snapshot file at a time."""
    position = 0
    for s in steps:
        for network in read_snapshot(snapshot_path(folder, s))["networks"]:
            yield coefficients[position], network
            position += 1


def snapshot_folder(checkpoint: dict) -> Path | None:
    """The snapshot folder the ``PostHocEMA`` callback of the checkpoint's run wrote to, if it had one."""
    folder = checkpoint.get("callbacks", {}).get(CALLBACK_STATE, {}).get("folder")
    return Path(folder) if folder else None


def evaluation_checkpoint(checkpoint: dict, result: Reconstruction, weights: str | None = None) -> dict:
    """A copy of ``checkpoint`` whose ``weights`` network (default: its ``eval_weights``) is ``result``'s, for
    evaluation: without optimizer, scheduler, loop and callback state; ``post_hoc_ema`` records the recipe."""
    hparams = checkpoint["hyper_parameters"]
    weights = weights or hparams.get("eval_weights", "ema")
    slots = weights_keys(hparams.get("ema_decays", []))
    if weights not in slots:
        raise ValueError(f"weights must be one of {sorted(slots)} for this checkpoint, got {weights!r}")
    state = dict(checkpoint["state_dict"])
    prefix = slots[weights]
    missing = [k for k in result.state_dict if f"{prefix}.{k}" not in state]
    if missing:
        raise ValueError(f"the snapshots do not hold this checkpoint's network: {missing[:3]} are not in its "
                         f"'{prefix}' weights")
    state.update({f"{prefix}.{k}": v.to(state[f"{prefix}.{k}"].dtype) for k, v in result.state_dict.items()})
    dropped = ("optimizer_states", "lr_schedulers", "loops", "callbacks")
    out = {k: v for k, v in checkpoint.items() if k not in dropped} | {"state_dict": state}
    out["hyper_parameters"] = {**hparams, "eval_weights": weights}
    out["post_hoc_ema"] = {"sigma_rel": result.sigma_rel, "step": result.step, "weights": weights,
                           "snapshot_steps": result.snapshot_steps, "coefficients": result.coefficients}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint of the run (e.g. its last.ckpt)")
    parser.add_argument("--sigma-rel", type=float, nargs="+", required=True, help="averaging lengths to reconstruct")
    parser.add_argument("--out", type=Path, required=True, help="folder for phema_<sigma_rel>.ckpt (created)")
    parser.add_argument("--snapshots", type=Path, help="snapshot folder (default: the one the run recorded)")
    parser.add_argument("--step", type=int, help="reconstruct at this step (default: the last snapshot's)")
    parser.add_argument("--weights", help="the weights to replace (default: the checkpoint's eval_weights)")
    args = parser.parse_args(argv)
    for s in args.sigma_rel:
        try:
            sigma_rel_to_gamma(s)
        except ValueError as err:
            parser.error(str(err))
    targets = {s: args.out / f"phema_{s:.3f}.ckpt" for s in args.sigma_rel}
    taken = [str(p) for p in targets.values() if p.exists()]
    if taken:
        parser.error(f"{', '.join(taken)} exist: choose another --out, existing files are never replaced")
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    folder = args.snapshots or snapshot_folder(checkpoint)
    if folder is None:
        parser.error(f"{args.checkpoint} records no post-hoc EMA snapshot folder: pass --snapshots")
    args.out.mkdir(parents=True, exist_ok=True)
    for result in reconstruct(folder, args.sigma_rel, args.step):
        out = evaluation_checkpoint(checkpoint, result, args.weights)
        atomic_write(targets[result.sigma_rel], lambda tmp: torch.save(out, tmp), durable=True)
        print(f"sigma_rel {result.sigma_rel}: step {result.step}, {len(result.snapshot_steps)} snapshots -> "
              f"{targets[result.sigma_rel]}")


if __name__ == "__main__":
    main()

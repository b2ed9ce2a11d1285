"""Post-hoc EMA (EDM2, arXiv 2312.02696): track two power-function averages while training, save snapshots, and
choose the averaging length by FID after the run (``PostHocEMASweep``) instead of guessing it before."""

import json
from pathlib import Path

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from callbacks.fid import FID, _datamodule
from cm_lightning.core.post_hoc_ema import sigma_rel_to_gamma, update_power_ema
from cm_lightning.io.post_hoc_ema import CALLBACK_STATE, reconstruct, snapshot_folder, snapshot_path, snapshot_steps, write_snapshot


class PostHocEMA(Callback):
    """Keeps power-function EMAs of the online network for ``sigma_rels`` (EDM2: 0.05 and 0.10) and writes a
    snapshot of them every ``every_n_steps`` optimizer steps and at the end of ``fit``:

        cm-lightning fit --config configs/mnist_edm.yaml --trainer.callbacks+=callbacks.PostHocEMA

    Snapshots go to ``folder`` (default: ``post_hoc_ema`` in the run's log folder; a resumed run keeps writing to
    the folder it started), written atomically by global rank 0 only, which alone holds the averages (float32,
    on the module's device). At most ``max_snapshots`` files are kept: beyond that the interval doubles and the
    snapshots off the new interval are deleted, so a run of any length covers its whole history in bounded disk.
    The averages and the interval are in the checkpoint; a resumed run deletes the snapshots written after the
    step it resumes from (a lost continuation) and goes on exactly. Reconstruct any σ_rel with
    ``python -m cm_lightning.io.post_hoc_ema`` or score a list of them with ``PostHocEMASweep``.
    """

    def __init__(self, sigma_rels: list[float] = [0.05, 0.10], every_n_steps: int = 100, max_snapshots: int = 32,
                 folder: str | None = None):
        """
        Args:
            sigma_rels: widths of the tracked profiles relative to the run's length (EDM2 Eq. 123), each in (0, 0.2887].
            every_n_steps: optimizer steps between snapshots.
            max_snapshots: files kept; the interval doubles when there would be more (at least 4).
            folder: where the snapshots go; None: ``<run log folder>/post_hoc_ema``.
        """
        self.gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]  # refuses a bad σ_rel by value
        if len(set(sigma_rels)) != len(sigma_rels) or not sigma_rels:
            raise ValueError(f"sigma_rels must be distinct and non-empty, got {sigma_rels}")
        if every_n_steps < 1 or max_snapshots < 4:
            raise ValueError(f"every_n_steps must be >= 1 and max_snapshots >= 4, got {every_n_steps} and {max_snapshots}")
        self.sigma_rels, self.max_snapshots = [float(s) for s in sigma_rels], max_snapshots
        self.folder = Path(folder) if folder else None
        self.interval = every_n_steps
        self.averages: list[dict[str, torch.Tensor]] | None = None  # global rank 0 only
        self._restored: dict | None = None  # the checkpoint's state, when fit resumes
        self._last_step = 0

    # -- state ---------------------------------------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        """One name for this callback and its subclasses, which the reconstruction command looks up."""
        return CALLBACK_STATE

    def state_dict(self) -> dict:
        return {"sigma_rels": self.sigma_rels, "interval": self.interval,
                "folder": str(self.folder) if self.folder else None, "averages": self.averages}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = state_dict  # applied when a resumed fit starts; test and predict need none of it

    def _resume(self, state: dict) -> None:
        if [float(s) for s in state["sigma_rels"]] != self.sigma_rels:
            raise ValueError(f"this run tracked post-hoc EMAs for sigma_rels={state['sigma_rels']}; resume it with "
                             f"those, not {self.sigma_rels}")
        self.interval = state["interval"]
        self.folder = Path(state["folder"]) if state["folder"] else self.folder
        self.averages = state["averages"]

    # -- training ------------------------------------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self.folder is None:
            self.folder = Path(trainer.log_dir or trainer.default_root_dir) / "post_hoc_ema"

    def on_train_start(self, trainer, pl_module) -> None:
        resumed, state, self._restored = self._restored is not None, self._restored, None
        if resumed:
            self._resume(state)
        step = self._last_step = trainer.global_step
        existing = snapshot_steps(self.folder)
        if not resumed and existing:  # checked on every rank, so that all of them stop
            raise FileExistsError(f"{self.folder} holds post-hoc EMA snapshots of another run ({len(existing)} files, "
                                  f"up to step {existing[-1]}): give the callback another folder, or resume that run")
        if not trainer.is_global_zero:
            self.averages = None  # only rank 0 averages and writes: the weights are the same on every rank
            return
        for stale in (s for s in existing if s > step):  # written after the checkpoint we resume from
            snapshot_path(self.folder, stale).unlink()
        if self.averages is None:
            if step > 0:
                rank_zero_warn(f"PostHocEMA starts at step {step}: its averages treat the first {step} steps as if "
                               "they had today's weights. Track from the start of a run for exact profiles.")
            self.averages = [self._online_state(pl_module) for _ in self.gammas]
        self.averages = [{k: v.to(pl_module.device) for k, v in a.items()} for a in self.averages]

    @staticmethod
    def _online_state(pl_module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                for k, v in pl_module.online.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step:  # inside gradient accumulation: no optimizer step yet
            return
        self._last_step = step
        if self.averages is None:
            return
        current = list(pl_module.online.state_dict().values())
        for gamma, average in zip(self.gammas, self.averages):
            update_power_ema(list(average.values()), current, gamma, step)
        if step % self.interval == 0:
            self._snapshot(step)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.averages is not None and trainer.global_step > 0 and trainer.global_step not in snapshot_steps(self.folder):
            self._snapshot(trainer.global_step)

    def _snapshot(self, step: int) -> None:
        write_snapshot(self.folder, step, self.sigma_rels, self.gammas, self.averages)
        steps = snapshot_steps(self.folder)
        while len(steps) > self.max_snapshots:  # thin out: keep every other interval, and the newest
            self.interval *= 2
            for s in steps[:-1]:
                if s % self.interval:
                    snapshot_path(self.folder, s).unlink()
            steps = snapshot_steps(self.folder)


class PostHocEMASweep(FID):
    """``cm-lightning test`` that reconstructs the network for each σ_rel in ``sigma_rels`` from a run's post-hoc EMA
    snapshots and scores each by FID, as the step search scores noise levels:

        cm-lightning test --config configs/mnist_edm.yaml --data.data_dir ../shared/data --ckpt_path last \\
            --trainer.callbacks=callbacks.PostHocEMASweep --trainer.callbacks.sigma_rels=[0.03,0.05,0.1,0.15]

    Logs ``test/fid_<sampler>_phema<σ_rel>`` per σ_rel and sampler, prints the table and the best σ_rel per
    sampler, writes them to ``output`` (JSON) if given, and leaves the module's weights as they were. The
    snapshot folder is the one the checkpoint's run recorded, unless ``snapshots`` names one.
    """

    def __init__(self, sigma_rels: list[float] = [0.03, 0.05, 0.075, 0.1, 0.15, 0.2], snapshots: str | None = None,
                 step: int | None = None, output: str | None = None, **kwargs):
        """
        Args:
            sigma_rels: averaging lengths to score, each in (0, 0.2887].
            snapshots: the snapshot folder; None: the one recorded in the checkpoint given by ``--ckpt_path``.
            step: reconstruct as of this step; None: the last snapshot's.
            output: a JSON file for every score and the best σ_rel per sampler.
            **kwargs: the FID callback's (num_samples, samplers, feature, batch_size, seed, weights, …).
        """
        super().__init__(kid=False, **kwargs)
        for s in sigma_rels:
            sigma_rel_to_gamma(s)
        self.sigma_rels, self.step, self.output = [float(s) for s in sigma_rels], step, output
        self.snapshots = Path(snapshots) if snapshots else None
        self.result: dict | None = None

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.snapshots is None:
            self.snapshots = snapshot_folder(checkpoint)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        pass  # a sweep runs in test only

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        if self.snapshots is None:
            raise ValueError("PostHocEMASweep needs the snapshots: pass --ckpt_path of a run trained with "
                             "callbacks.PostHocEMA, or --trainer.callbacks.snapshots <folder>")
        network = pl_module.network(self.weights or pl_module.hparams.eval_weights)
        kept = {k: v.clone() for k, v in network.state_dict().items()}
        metrics = [m.to(pl_module.device) for m in self._metrics.values()]
        self._embed_real(trainer, pl_module, _datamodule(trainer).test_dataloader(), metrics)
        table: dict[str, dict[str, float]] = {}
        try:
            for result in reconstruct(self.snapshots, self.sigma_rels, self.step):
                network.load_state_dict(result.state_dict)
                for (name, metric), spec in zip(self._metrics.items(), self._samplers):
                    label = f"sigma_rel {result.sigma_rel:g} FID {name}"
                    fid = self._score(trainer, pl_module, metric, spec, self.test_num_samples, label)["fid"]
                    pl_module.log(f"test/fid_{name}_phema{result.sigma_rel:g}", fid, sync_dist=False, rank_zero_only=False)
                    table.setdefault(name, {})[f"{result.sigma_rel:g}"] = round(fid.item(), 4)
                    rank_zero_info(f"  sigma_rel {result.sigma_rel:g}, {name}: FID {fid.item():.2f}")
        finally:
            network.load_state_dict(kept)
        best = {name: min(scores, key=scores.get) for name, scores in table.items()}
        self.result = {"step": self.step, "snapshots": str(self.snapshots), "num_samples": self.test_num_samples,
                       "fid": table, "best_sigma_rel": {n: float(s) for n, s in best.items()}}
        rank_zero_info(f"Best sigma_rel per sampler: {self.result['best_sigma_rel']}")
        if self.output and trainer.is_global_zero:
            Path(self.output).parent.mkdir(parents=True, exist_ok=True)
            Path(self.output).write_text(json.dumps(self.result, indent=2))

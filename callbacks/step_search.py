"""StepSearch: ``cm-lightning test`` that searches the noise levels of few-step sampling minimising FID."""

import json
from pathlib import Path
from typing import Literal

from lightning.pytorch.utilities import rank_zero_info

from callbacks.fid import FID, _datamodule
from cm_lightning.methods.consistency import ConsistencyModule
from cm_lightning.sampling.schedule_search import search_schedule


class StepSearch(FID):
    """Searches the intermediate noise level of two-step consistency sampling (then, with ``steps`` > 2,
    each further level below it, greedily) by ternary search over a Karras grid, scoring each candidate
    schedule by FID on the test set, as the reference code's ternary search. Runs in ``test``:

        cm-lightning test --config configs/mnist_quickstart.yaml --data.data_dir ../shared/data --ckpt_path last \\
            --trainer.callbacks=callbacks.StepSearch --trainer.callbacks.num_samples=2000

    Logs ``test/search_fid`` (the best schedule's FID), prints every candidate and the found schedule in
    the form ``--model.predict_sampler`` and ``sample`` take, and writes them to ``output`` (JSON) if given.
    Generation is spread over the ranks like the FID callback's; every rank takes the same decisions.
    """

    def __init__(self, steps: int = 2, num_scales: int = 40, num_samples: int = 10000, output: str | None = None,
                 baseline: list[float] | None = [80.0, 0.8], grid: Literal["training", "free"] = "training", **kwargs):
        """
        Args:
            steps: levels of the schedule to find (2: σ_max and one intermediate level).
            num_scales: the Karras grid the levels are chosen from (the reference: 40), unless ``grid`` says otherwise.
            num_samples: generated images per candidate schedule.
            output: a JSON file for the found schedule, its FID and every candidate scored.
            baseline: a schedule scored first on the same images, to compare the found one with (the usual
                two-step [80, 0.8]); None skips it.
            grid: "training": a method with fixed training levels (CD) is searched on exactly those levels, where
                it learned f; other methods on the Karras grid of ``num_scales``. "free": that Karras grid always.
            **kwargs: the FID callback's (feature, batch_size, seed, weights, inception_weights).
        """
        super().__init__(num_samples=num_samples, kid=False, **kwargs)
        if steps < 2 or num_scales < steps + 1:
            raise ValueError(f"steps must be >= 2 and num_scales > steps, got steps={steps}, num_scales={num_scales}")
        if grid not in ("training", "free"):
            raise ValueError(f"grid must be 'training' or 'free', got {grid!r}")
        self.steps, self.num_scales, self.output, self.grid = steps, num_scales, output, grid
        self.baseline = [float(s) for s in baseline] if baseline else None
        self.result: dict | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.check_model(pl_module)
        self._metrics = {}

    def check_model(self, pl_module) -> None:
        if self.baseline is not None:
            pl_module.sampler(self.baseline)  # refused now, by the model's rules, not after the search
        if not isinstance(pl_module, ConsistencyModule):
            raise ValueError(f"StepSearch chooses the noise levels of consistency sampling; a {type(pl_module).__name__} "
                             "is not a consistency model (a diffusion model's steps are set by heun<N> / euler<N>)")
        if self.feature == "mnist" and pl_module.image_shape[0] != 1:
            raise ValueError(f"feature='mnist' needs 1-channel images, the model has channels={pl_module.image_shape[0]}")

    def candidates(self, pl_module) -> list[float] | None:
        """The levels to search: the model's training levels (``grid="training"``, if it has fixed ones), else None
        (the Karras grid of ``num_scales``)."""
        return pl_module.training_levels() if self.grid == "training" else None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        pass  # a search runs in test only

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        metric = self._metric(pl_module.image_shape).to(pl_module.device)
        self._embed_real(trainer, pl_module, _datamodule(trainer).test_dataloader(), [metric])

        def score(schedule: list[float]) -> float:
            label = "search FID [" + ", ".join(f"{s:.4g}" for s in schedule) + "]"
            return self._score(trainer, pl_module, metric, schedule, self.num_samples, label)["fid"].item()

        def report(schedule: list[float], value: float) -> None:
            rank_zero_info(f"  {[round(s, 4) for s in schedule]}: FID {value:.2f}")

        h = pl_module.hparams
        baseline = None
        if self.baseline is not None:
            baseline = {"schedule": self.baseline, "fid": score(self.baseline)}
            rank_zero_info(f"Baseline {self.baseline}: FID {baseline['fid']:.2f}")
        grid = self.candidates(pl_module)
        where = f"the model's {len(grid)} training levels" if grid else f"a {self.num_scales}-level Karras grid"
        rank_zero_info(f"Searching a {self.steps}-level schedule on {where} ({self.num_samples} images per candidate):")
        schedule, best, scored = search_schedule(score, self.steps, self.num_scales, h.sigma_min, h.sigma_max, h.rho, report,
                                                 grid)
        schedule = [round(s, 4) for s in schedule]
        pl_module.log("test/search_fid", best, sync_dist=False, rank_zero_only=False)
        self.result = {"schedule": schedule, "fid": best, "num_samples": self.num_samples, "baseline": baseline,
                       "scored": [{"schedule": list(k), "fid": v} for k, v in scored.items()]}
        rank_zero_info(f"Best schedule {schedule}: FID {best:.2f}. Use it with --model.predict_sampler '{schedule}' "
                       f"or module.sample(n, {schedule}).")
        if self.output and trainer.is_global_zero:
            Path(self.output).parent.mkdir(parents=True, exist_ok=True)
            Path(self.output).write_text(json.dumps(self.result, indent=2) + "\n")

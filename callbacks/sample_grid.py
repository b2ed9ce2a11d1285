"""Sample grids from fixed noise, to TensorBoard and to PNG files, during training."""

import math
from pathlib import Path

from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torchvision.utils import make_grid, save_image

from cm_lightning.io.files import atomic_write


class SampleGrid(Callback):
    """Every ``every_n_steps`` optimizer steps and at the end of training, one grid per sampler.

    Image i of every grid is drawn from the noise seeded by (``seed``, i), so grids are comparable
    across steps. A class-conditional model's grid has one row per class (⌊num_samples / K⌋ images each, at
    least one). Rank zero samples and writes; the other ranks go on (sampling needs no collective).
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        num_samples: int = 64,
        samplers: list[list[float] | str] | None = None,
        seed: int = 0,
        weights: str | None = None,
    ):
        """
        Args:
            every_n_steps: optimizer steps between grids.
            num_samples: images per grid.
            samplers: one grid each: a σ list ([80.0] one consistency step, [80.0, 0.8] two) or "heun<N>" /
                "euler<N>"; None: the model's own (``eval_samplers``).
            seed: seed of the fixed noise.
            weights: "online", "ema" or "ema_<decay>"; None takes the module's ``eval_weights``.
        """
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if samplers is not None and not samplers:
            raise ValueError("samplers must hold at least one sampler, e.g. [[80.0]] or ['heun18'], or be None")
        self.every_n_steps, self.num_samples, self.samplers = every_n_steps, num_samples, samplers
        self.seed, self.weights = seed, weights
        self._last_written = -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._samplers = self.samplers or pl_module.eval_samplers
        pl_module.check_sampling(self._samplers, self.weights)  # before training, not at step N
        # trainer.log_dir is a broadcast: every rank must ask, here, not rank zero alone later on
        self.folder = Path(trainer.log_dir or trainer.default_root_dir) / "samples"

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_written = trainer.global_step  # a resumed run drew this step's grid before it stopped

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # The module moved its EMAs inside the optimizer step: "step N" shows the weights of step N.
        if trainer.global_step % self.every_n_steps == 0:
            self._write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module)

    def _images(self, pl_module, spec):
        """(images, images per row): a square-ish grid, or for K classes one row per class."""
        k = pl_module.num_classes
        if not k:
            x = pl_module.sample(self.num_samples, spec, weights=self.weights, seed=self.seed)
            return x, math.ceil(math.sqrt(len(x)))
        per_class = max(1, self.num_samples // k)
        x = pl_module.sample(per_class * k, spec, weights=self.weights, seed=self.seed)  # image i: class i mod K
        return x.unflatten(0, (per_class, k)).transpose(0, 1).flatten(0, 1), per_class

    def _write(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if step == self._last_written or not trainer.is_global_zero:
            return
        self._last_written = step
        self.folder.mkdir(parents=True, exist_ok=True)
        for spec in self._samplers:
            grid = make_grid(*self._images(pl_module, spec), normalize=True, value_range=(-1, 1))
            name = spec if isinstance(spec, str) else "sigmas_" + "-".join(f"{s:g}" for s in spec)
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(f"samples/{name}", grid, step)
            path = self.folder / f"step{step:07d}_{name}.png"
            atomic_write(path, lambda tmp: save_image(grid, tmp, format="png"))  # never a half-written PNG

"""FID of generated samples against the DataModule's reference images, per sampling schedule (torchmetrics)."""

import torch
from lightning.pytorch import Callback
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from tqdm.auto import tqdm

from cm_lightning.base import images_of
from cm_lightning.sampling import parse_sampler
from cm_lightning.mnist_classifier import MNISTClassifier

FEATURES = ("mnist", "inception")


class FID(Callback):
    """Logs ``val/fid_<name>`` after every validation and ``test/fid_<name>`` in ``test``, per sampler
    (``fid_1step``, ``fid_2step`` for σ lists, ``fid_heun18`` for the ODE).

    Each rank generates its share of ``num_samples`` images, image i from noise seeded by (``seed``, i);
    torchmetrics syncs the feature statistics, so the FID uses ``num_samples`` images in total and does
    not depend on the number of ranks or on ``batch_size`` (beyond float rounding in the network).
    Real-image statistics are computed once per run from the validation split (fit) or test set (test).
    """

    def __init__(
        self,
        num_samples: int = 10000,
        test_num_samples: int | None = None,
        samplers: list[list[float] | str] | None = None,
        test_samplers: list[list[float] | str] | None = None,
        feature: str | nn.Module = "mnist",
        inception_weights: str | None = None,
        batch_size: int = 500,
        seed: int = 0,
        weights: str | None = None,
    ):
        """
        Args:
            num_samples: generated images per schedule, over all ranks.
            test_num_samples: the same for ``test``; None uses ``num_samples``.
            samplers: one FID each, logged as fid_<name>: a σ list ([80.0] is fid_1step, [80.0, 0.8] fid_2step)
                or "heun<N>" / "euler<N>" (fid_heun18); None: the model's own (``eval_samplers``).
            test_samplers: the same for ``test``; None uses ``samplers``.
            feature: "mnist" (the shipped classifier; comparable only with itself), "inception" (2048-d pool3),
                or any nn.Module mapping images in [-1, 1], (N, C, H, W), to features (N, d).
            inception_weights: local Inception weights file for offline machines (torchmetrics' format).
            batch_size: images generated and embedded at once.
            seed: seed of the generation noise.
            weights: "online", "ema" or "ema_<decay>"; None takes the module's ``eval_weights``.
        """
        test_num_samples = num_samples if test_num_samples is None else test_num_samples
        for name, value in (("num_samples", num_samples), ("test_num_samples", test_num_samples)):
            if value < 2:
                raise ValueError(f"{name} must be >= 2 for FID (a covariance needs two images), got {value}")
        if not isinstance(feature, nn.Module) and feature not in FEATURES:
            raise ValueError(f"feature must be one of {FEATURES} or an nn.Module, got {feature!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for given in (samplers, test_samplers):
            if given is not None and (not given or len({parse_sampler(s).name for s in given}) != len(given)):
                raise ValueError(f"samplers must be non-empty with distinct names (σ lists of distinct lengths), got {given}")
        self.num_samples, self.test_num_samples = num_samples, test_num_samples
        self.samplers, self.test_samplers, self.feature = samplers, test_samplers, feature
        self.inception_weights, self.batch_size, self.seed, self.weights = inception_weights, batch_size, seed, weights
        self._metrics: dict[str, FrechetInceptionDistance] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        given = self.test_samplers if stage == "test" and self.test_samplers else self.samplers
        self._samplers = given or pl_module.eval_samplers
        pl_module.check_sampling(self._samplers, self.weights)
        shape = pl_module.image_shape
        if self.feature == "mnist" and shape[0] != 1:
            raise ValueError(f"feature='mnist' needs 1-channel images, the model has channels={shape[0]}")
        self._metrics = {pl_module.sampler(s).name: self._metric(shape) for s in self._samplers}

    def _metric(self, image_shape: tuple[int, int, int] = (1, 32, 32)) -> FrechetInceptionDistance:
        if isinstance(self.feature, nn.Module):  # torchmetrics probes the feature size with one image
            return FrechetInceptionDistance(self.feature, reset_real_features=False, normalize=True, input_img_size=image_shape)
        if self.feature == "mnist":
            return FrechetInceptionDistance(feature=MNISTClassifier.pretrained(), reset_real_features=False)
        try:
            return FrechetInceptionDistance(
                feature=2048, normalize=True, reset_real_features=False, feature_extractor_weights_path=self.inception_weights
            )
        except Exception as err:  # missing torch-fidelity or weights that cannot be downloaded
            raise RuntimeError(
                f"Inception features are unavailable ({err}). Install torch-fidelity and let it download the weights "
                "once, or pass --trainer.callbacks.inception_weights <file>, or use feature='mnist' for MNIST."
            ) from err

    def _prepare(self, x: Tensor) -> Tensor:
        """[-1, 1] images as the extractor wants them: as they are for the classifier, RGB in [0, 1] for Inception."""
        return ((x + 1) / 2).expand(-1, 3, -1, -1) if self.feature == "inception" else x

    @torch.no_grad()
    def _evaluate(self, trainer, pl_module, loader, prefix: str, num_samples: int) -> None:
        metrics = [m.to(pl_module.device) for m in self._metrics.values()]
        if int(metrics[0].real_features_num_samples) == 0:  # once per run; each rank embeds its share
            for i, batch in enumerate(loader):
                if i % trainer.world_size != trainer.global_rank:
                    continue
                x = self._prepare(images_of(batch).to(pl_module.device))
                for m in metrics:
                    m.update(x, real=True)
        per_rank = -(-num_samples // trainer.world_size)  # ceil: rank r makes images r·per_rank …
        first, last = trainer.global_rank * per_rank, min(num_samples, (trainer.global_rank + 1) * per_rank)
        show = trainer.is_global_zero and trainer.progress_bar_callback is not None
        for (name, metric), spec in zip(self._metrics.items(), self._samplers):
            metric.reset()  # fake statistics only
            nfe = pl_module.sampler(spec).nfe
            with tqdm(total=last - first, desc=f"{prefix} FID {name} ({nfe} network evaluations per image)",
                      unit="img", disable=not show, leave=False, dynamic_ncols=True) as bar:
                for start in range(first, last, self.batch_size):
                    count = min(self.batch_size, last - start)
                    x = pl_module.sample(count, spec, weights=self.weights, seed=self.seed, first_index=start)
                    metric.update(self._prepare(x), real=False)
                    bar.update(count)
            pl_module.log(f"{prefix}/fid_{name}", metric.compute().float(), sync_dist=False, rank_zero_only=False)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._evaluate(trainer, pl_module, _datamodule(trainer).val_dataloader(), "val", self.num_samples)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._evaluate(trainer, pl_module, _datamodule(trainer).test_dataloader(), "test", self.test_num_samples)


def _datamodule(trainer):
    if trainer.datamodule is None:
        raise ValueError("the FID callback reads its reference images from a DataModule: pass datamodule= to the Trainer")
    return trainer.datamodule

"""FID and KID of generated samples against the DataModule's reference images, per sampling schedule (torchmetrics)."""

import torch
from lightning.pytorch import Callback
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance, poly_mmd
from tqdm.auto import tqdm

from cm_lightning.methods.base import images_of
from cm_lightning.sampling.samplers import parse_sampler
from cm_lightning.nets.mnist_classifier import MNISTClassifier

FEATURES = ("mnist", "inception")


class Features(nn.Module):
    """Identity on features already extracted: lets torchmetrics' FID and KID share one feature pass."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


class Scores:
    """FID and (optionally) KID of generated against real images from one pass of a feature extractor.

    ``update`` takes images in [-1, 1]; ``reset`` forgets the generated ones only; ``compute`` gives
    {"fid", and with KID "kid", "kid_std"}. KID (Bińkowski et al. 2018) is the unbiased polynomial-kernel
    MMD over ``kid_subsets`` random subsets of ``kid_subset_size`` images (fewer if fewer were seen),
    drawn from a generator seeded by ``seed``, so the same images give the same KID.
    """

    def __init__(self, extractor: nn.Module, num_features: int, kid: bool = True, kid_subsets: int = 100,
                 kid_subset_size: int = 1000, seed: int = 0):
        self.extractor, self.seed, self.kid_subset_size = extractor, seed, kid_subset_size
        # generated images with the class they were asked for: correct calls and the asked class's probability
        self.classified = torch.zeros(3, dtype=torch.float64)  # (images, correct, summed probability)
        self.fid = FrechetInceptionDistance(Features(num_features), reset_real_features=False)
        # KID's features are gathered over the ranks here (``compute``), not by torchmetrics' list-state sync
        self.kid = (KernelInceptionDistance(Features(num_features), subsets=kid_subsets, subset_size=kid_subset_size,
                                            reset_real_features=False, sync_on_compute=False) if kid else None)

    def to(self, device) -> "Scores":
        self.extractor.to(device)
        self.fid.to(device)
        if self.kid is not None:
            self.kid.to(device)
        return self

    @property
    def real_count(self) -> int:
        return int(self.fid.real_features_num_samples)

    @property
    def fake_count(self) -> int:
        return int(self.fid.fake_features_num_samples)

    @property
    def classifies(self) -> bool:
        """Whether the features come from a classifier whose head can call the class (the shipped MNIST one)."""
        return isinstance(self.extractor, MNISTClassifier)

    @torch.no_grad()
    def update(self, images: Tensor, real: bool, labels: Tensor | None = None) -> None:
        """Add images in [-1, 1]; generated ones with the ``labels`` they were asked for are also classified
        (``classifies`` only): class accuracy and the probability the classifier gives the asked class."""
        features = self.extractor(images).float()
        self.fid.update(features, real=real)
        if self.kid is not None:
            self.kid.update(features, real=real)
        if labels is not None and self.classifies:
            probs = self.extractor.head(features).float().softmax(1)
            labels = labels.to(probs.device)
            counts = torch.stack([torch.tensor(float(len(labels)), device=probs.device),
                                  (probs.argmax(1) == labels).sum().double(), probs.gather(1, labels[:, None]).sum().double()])
            self.classified = self.classified.to(probs.device) + counts  # on the device: no host read per batch

    def reset(self) -> None:
        self.classified.zero_()
        self.fid.reset()
        if self.kid is not None:
            self.kid.reset()

    def compute(self) -> dict[str, Tensor]:
        out = {"fid": self.fid.compute().float()}
        if self.kid is not None:
            real, fake = (_gathered(self.kid.real_features), _gathered(self.kid.fake_features))
            size = min(self.kid_subset_size, len(real), len(fake))
            generator = torch.Generator().manual_seed(self.seed)  # the same subsets on every rank and run
            values = torch.stack([
                poly_mmd(real[torch.randperm(len(real), generator=generator)[:size].to(real.device)],
                         fake[torch.randperm(len(fake), generator=generator)[:size].to(fake.device)])
                for _ in range(self.kid.subsets)])
            out |= {"kid": values.mean().float(), "kid_std": values.std(unbiased=False).float()}
        counts = _gathered([self.classified[None]]).sum(0)  # summed over the ranks
        if counts[0] > 0:
            out |= {"class_acc": (counts[1] / counts[0]).float(), "class_confidence": (counts[2] / counts[0]).float()}
        return out



def _gathered(parts: list[Tensor]) -> Tensor:
    """This rank's features, or under DDP every rank's, in rank order (sizes may differ between ranks)."""
    local = torch.cat(parts) if parts else torch.zeros(0, 0)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_world_size() == 1:
        return local
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, local.cpu())
    return torch.cat([t for t in everyone if t.numel()]).to(local.device)


class InceptionFeatures(nn.Module):
    """Images in [-1, 1] to torchmetrics' 2048-d Inception pool features (as FID(normalize=True) makes them)."""

    def __init__(self, weights: str | None = None):
        super().__init__()
        self.inception = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=weights).inception

    def forward(self, x: Tensor) -> Tensor:
        return self.inception((((x + 1) / 2).clamp(0, 1).expand(-1, 3, -1, -1) * 255).byte())


class FID(Callback):
    """Logs ``val/fid_<name>`` and ``val/kid_<name>`` (with ``val/kid_<name>_std``) after every validation,
    and ``test/…`` in ``test``, per sampler (``1step``, ``2step`` for σ lists, ``heun18`` for the ODE).
    A class-conditional model samples class-balanced images (image i of class i mod K); on the shipped MNIST
    classifier's features it also logs ``val/class_acc_<name>`` (the share of images that classifier calls the
    class they were asked for) and ``val/class_confidence_<name>`` (the mean probability it gives that class).

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
        kid: bool = True,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
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
            kid: also log KID on the same features and images (unbiased at small ``num_samples``, so the
                better in-training curve).
            kid_subsets: KID's number of random subsets (its mean and standard deviation are logged).
            kid_subset_size: images per KID subset (capped by the images there are).
        """
        test_num_samples = num_samples if test_num_samples is None else test_num_samples
        for name, value in (("num_samples", num_samples), ("test_num_samples", test_num_samples)):
            if value < 2:
                raise ValueError(f"{name} must be >= 2 for FID (a covariance needs two images), got {value}")
        if not isinstance(feature, nn.Module) and feature not in FEATURES:
            raise ValueError(f"feature must be one of {FEATURES} or an nn.Module, got {feature!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if kid_subsets < 1 or kid_subset_size < 2:
            raise ValueError(f"kid_subsets must be >= 1 and kid_subset_size >= 2, got {kid_subsets} and {kid_subset_size}")
        for given in (samplers, test_samplers):
            if given is not None and (not given or len({parse_sampler(s).name for s in given}) != len(given)):
                raise ValueError(f"samplers must be non-empty with distinct names (σ lists of distinct lengths), got {given}")
        self.num_samples, self.test_num_samples = num_samples, test_num_samples
        self.samplers, self.test_samplers, self.feature = samplers, test_samplers, feature
        self.inception_weights, self.batch_size, self.seed, self.weights = inception_weights, batch_size, seed, weights
        self.kid, self.kid_subsets, self.kid_subset_size = kid, kid_subsets, kid_subset_size
        self._metrics: dict[str, Scores] = {}
        self._classify = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        given = self.test_samplers if stage == "test" and self.test_samplers else self.samplers
        self._samplers = given or pl_module.eval_samplers
        pl_module.check_sampling(self._samplers, self.weights)
        shape = pl_module.image_shape
        if self.feature == "mnist" and shape[0] != 1:
            raise ValueError(f"feature='mnist' needs 1-channel images, the model has channels={shape[0]}")
        self._metrics = {pl_module.sampler(s).name: self._metric(shape) for s in self._samplers}
        classes = getattr(getattr(trainer, "datamodule", None), "classes", None)
        # class accuracy: a model of the ten digits, scored by the shipped digit classifier
        self._classify = pl_module.num_classes == 10 and classes in (None, [str(d) for d in range(10)])

    def _metric(self, image_shape: tuple[int, int, int] = (1, 32, 32)) -> Scores:
        extractor, num_features = self._extractor(image_shape)
        return Scores(extractor, num_features, self.kid, self.kid_subsets, self.kid_subset_size, self.seed)

    def _extractor(self, image_shape: tuple[int, int, int]) -> tuple[nn.Module, int]:
        """The feature extractor (images in [-1, 1] to (N, d)) and d."""
        if isinstance(self.feature, nn.Module):
            with torch.no_grad():
                num = getattr(self.feature, "num_features", None) or self.feature(torch.zeros(1, *image_shape)).shape[-1]
            return self.feature.eval(), int(num)
        if self.feature == "mnist":
            classifier = MNISTClassifier.pretrained().eval()
            return classifier, classifier.num_features
        try:
            return InceptionFeatures(self.inception_weights).eval(), 2048
        except Exception as err:  # missing torch-fidelity or weights that cannot be downloaded
            raise RuntimeError(
                f"Inception features are unavailable ({err}). Install torch-fidelity and let it download the weights "
                "once, or pass --trainer.callbacks.inception_weights <file>, or use feature='mnist' for MNIST."
            ) from err

    @torch.no_grad()
    def _embed_real(self, trainer, pl_module, loader, metrics: list[Scores]) -> None:
        """The real images' features, once per run; each rank embeds its share of the batches."""
        if metrics[0].real_count:
            return
        for i, batch in enumerate(loader):
            if i % trainer.world_size == trainer.global_rank:
                x = images_of(batch).to(pl_module.device)
                for m in metrics:
                    m.update(x, real=True)

    @torch.no_grad()
    def _score(self, trainer, pl_module, metric: Scores, spec, num_samples: int, label: str) -> dict[str, Tensor]:
        """Generate ``num_samples`` images with sampler ``spec`` over all ranks and score them (synced)."""
        per_rank = -(-num_samples // trainer.world_size)  # ceil: rank r makes images r·per_rank …
        first, last = trainer.global_rank * per_rank, min(num_samples, (trainer.global_rank + 1) * per_rank)
        show = trainer.is_global_zero and trainer.progress_bar_callback is not None
        metric.reset()  # fake statistics only
        nfe = pl_module.sampler(spec).nfe
        with tqdm(total=last - first, desc=f"{label} ({nfe} network evaluations per image)", unit="img",
                  disable=not show, leave=False, dynamic_ncols=True) as bar:
            for start in range(first, last, self.batch_size):
                count = min(self.batch_size, last - start)
                x = pl_module.sample(count, spec, weights=self.weights, seed=self.seed, first_index=start)
                labels = pl_module.sampling_labels(None, range(start, start + count))  # the balanced i mod K it used
                metric.update(x, real=False, labels=labels if self._classify else None)
                bar.update(count)
        return metric.compute()

    def _evaluate(self, trainer, pl_module, loader, prefix: str, num_samples: int) -> None:
        metrics = [m.to(pl_module.device) for m in self._metrics.values()]
        self._embed_real(trainer, pl_module, loader, metrics)
        for (name, metric), spec in zip(self._metrics.items(), self._samplers):
            for key, value in self._score(trainer, pl_module, metric, spec, num_samples, f"{prefix} FID {name}").items():
                pl_module.log(f"{prefix}/{key.replace('_std', '')}_{name}{'_std' if key.endswith('_std') else ''}",
                              value, sync_dist=False, rank_zero_only=False)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._evaluate(trainer, pl_module, _datamodule(trainer).val_dataloader(), "val", self.num_samples)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._evaluate(trainer, pl_module, _datamodule(trainer).test_dataloader(), "test", self.test_num_samples)


def _datamodule(trainer):
    if trainer.datamodule is None:
        raise ValueError("the FID callback reads its reference images from a DataModule: pass datamodule= to the Trainer")
    return trainer.datamodule


def fid_function(
    module, real_batches, num_samples: int = 10000, feature: str | nn.Module = "mnist", batch_size: int = 500,
    seed: int = 0, weights: str | None = None, inception_weights: str | None = None, progress: bool = True,
):
    """FID as a function of the sampler: ``score(sampler) -> float`` for ``module``'s samples against the
    images of ``real_batches`` (tensors or (images, labels) pairs, embedded once, on ``module.device``).

    The same machinery as the callback (features, seeded per-image noise), without a Trainer: for step
    searches and scripts. Each call generates ``num_samples`` images with a progress bar.
    """
    fid = FID(num_samples=num_samples, feature=feature, inception_weights=inception_weights, batch_size=batch_size,
              seed=seed, weights=weights, kid=False)
    module.check_sampling([], weights)
    scores = fid._metric(module.image_shape).to(module.device)
    for batch in real_batches:
        scores.update(images_of(batch).to(module.device), real=True)
    if scores.real_count < 2:
        raise ValueError(f"FID needs at least 2 real images, got {scores.real_count}")

    @torch.no_grad()
    def score(sampler) -> float:
        scores.reset()
        name = module.sampler(sampler).name
        with tqdm(total=num_samples, desc=f"FID {name}", unit="img", disable=not progress, leave=False) as bar:
            for start in range(0, num_samples, batch_size):
                count = min(batch_size, num_samples - start)
                scores.update(module.sample(count, sampler, weights=weights, seed=seed, first_index=start), real=False)
                bar.update(count)
        return scores.compute()["fid"].item()

    return score

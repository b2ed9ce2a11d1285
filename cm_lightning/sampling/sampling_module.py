"""What the callbacks (grids, FID, sample writer, step search) rely on in every method, and its implementation.

``SamplingModule`` is the written contract; ``Sampling`` implements it for a LightningModule over its
``hparams`` and named networks, so each method only says which sampler it uses by default.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from cm_lightning.core.conditioning import balanced_labels, bind_labels, labels_for_indices, validate_labels
from cm_lightning.core.noise import indexed_noise
from cm_lightning.sampling.samplers import Sampler, parse_sampler

SamplerSpec = list[float] | str


@runtime_checkable
class SamplingModule(Protocol):
    """What the callbacks (grids, FID, sample writer) rely on, for every method."""

    image_shape: tuple[int, int, int]

    def check_sampling(self, samplers: Sequence[SamplerSpec], weights: str | None) -> None: ...

    def sampler(self, spec: SamplerSpec | Sampler | None) -> Sampler: ...

    num_classes: int  # K of a class-conditional model, 0 otherwise

    def sample(self, num_samples: int, sampler=None, generator=None, weights=None, seed=None, first_index=0,
               labels=None) -> Tensor: ...

    def labels_for_indices(self, indices: Sequence[int]) -> Tensor | None: ...

    def sampling_labels(self, labels, indices: Sequence[int]) -> Tensor | None: ...


class Sampling:
    """``SamplingModule`` for a LightningModule with ``hparams`` (σ range, ``clip_denoised``, ``eval_weights``,
    ``predict_sampler``, ``predict_seed``), ``online.net`` and ``network(weights)``: GenerativeModule's sampling."""

    default_sampler: SamplerSpec = [80.0]  # of ``sample`` and ``predict``
    eval_samplers: list[SamplerSpec] = [[80.0], [80.0, 0.8]]  # of grids and FID, unless they are told

    @property
    def image_shape(self) -> tuple[int, int, int]:
        net = self.online.net
        return net.channels, net.image_size, net.image_size

    def sampling_guidance(self) -> float:
        """Classifier-free guidance scale w of this model's sampling; 1 (none) unless a method guides its own samples
        (the diffusion model's ``guidance_scale``)."""
        return 1.0

    def labels_for_indices(self, indices: Sequence[int]) -> Tensor | None:
        """The class of sample index i for ``predict`` and editing (``predict_labels``: balanced i mod K by default);
        None for an unconditional model."""
        if not self.num_classes:
            return None
        return labels_for_indices(indices, self.num_classes, self.hparams.predict_labels)

    def sampling_labels(self, labels, indices: Sequence[int]) -> Tensor | None:
        """Labels of the images of ``indices``: given ones (an int for all, or one per image) checked, else balanced
        (i mod K) for a conditional model; None for an unconditional one, which refuses labels."""
        if labels is None:
            return balanced_labels(indices, self.num_classes) if self.num_classes else None
        if not self.num_classes:
            raise ValueError("labels= was given to an unconditional model (its network has num_classes=0)")
        labels = torch.as_tensor(labels)
        labels = labels.reshape(1).expand(len(indices)) if labels.dim() == 0 else labels  # one class for all
        if len(labels) != len(indices):
            raise ValueError(f"labels= holds {len(labels)} labels for {len(indices)} images")
        return validate_labels(labels, self.num_classes)

    def sampler(self, spec: SamplerSpec | Sampler | None = None) -> Sampler:
        """A sampler value from a config value (σ list, "heun<N>", a Sampler), checked against this model."""
        chosen = parse_sampler(self.default_sampler if spec is None else spec, self.hparams.clip_denoised)
        chosen.validate(self.hparams.sigma_min, self.hparams.sigma_max)
        return chosen

    def check_sampling(self, samplers: Sequence[SamplerSpec], weights: str | None) -> None:
        """Refuse samplers or a weights name this model cannot use (callbacks call it in ``setup``)."""
        for spec in samplers:
            self.sampler(spec)
        self.network(weights or self.hparams.eval_weights)

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        sampler: SamplerSpec | Sampler | None = None,
        generator: torch.Generator | None = None,
        weights: str | None = None,
        seed: int | None = None,
        first_index: int = 0,
        labels: int | Sequence[int] | Tensor | None = None,
    ) -> Tensor:
        """Draw ``num_samples`` images in [-1, 1], shape (N, C, H, W).

        ``sampler``: a σ list (``(80.0,)`` one consistency step, ``(80.0, 0.8)`` two), "heun<N>" /
        "euler<N>", or a sampler value; None takes the method's default. Noise comes from ``generator``
        (CPU or device), or, given ``seed``, per image: image ``first_index + j`` depends on (seed, index)
        alone, not on the batch it is drawn in. ``weights`` names the network ("online", "ema",
        "ema_<decay>"); None takes ``eval_weights``. ``labels`` (class-conditional models only): one class for all,
        or one per image; None gives image i the class i mod K, so any N images are class-balanced.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if seed is not None and generator is not None:
            raise ValueError("give either generator= or seed=, not both")
        sampler = self.sampler(sampler)
        indices = range(first_index, first_index + num_samples)
        labels = self.sampling_labels(labels, indices)
        if seed is not None:
            return self.sample_indexed(indices, sampler, seed, weights, labels)
        device = generator.device if generator is not None else self.device
        noise = torch.randn(sampler.num_draws, num_samples, *self.image_shape, generator=generator, device=device)
        return self.sample_from_noise(noise, sampler, weights, labels)

    def sample_indexed(self, indices: Sequence[int], sampler, seed: int, weights: str | None = None,
                       labels: Tensor | None = None) -> Tensor:
        """Image ``indices[j]`` from the noise seeded by (seed, indices[j]): batch- and rank-free sampling; a
        conditional model's labels default to the balanced i mod K."""
        sampler = self.sampler(sampler)
        noise = indexed_noise(seed, indices, sampler.num_draws, self.image_shape)
        return self.sample_from_noise(noise, sampler, weights, self.sampling_labels(labels, indices))

    @torch.no_grad()
    def sample_from_noise(self, noise: Tensor, sampler, weights: str | None = None, labels: Tensor | None = None) -> Tensor:
        """Images from given noise (num_draws, B, C, H, W): the sampler behind ``sample`` and ``predict``; a
        conditional model's network conditioned on ``labels`` (B,) and guided by ``sampling_guidance``."""
        sampler, h = self.sampler(sampler), self.hparams
        if self.num_classes and labels is None:
            raise ValueError("a class-conditional model samples with labels (B,)")
        labels = None if labels is None else labels.to(self.device)
        with self.evaluating(weights) as f:
            f = bind_labels(f, labels, self.sampling_guidance() if labels is not None else 1.0)
            return sampler(f, noise.to(self.device), h.sigma_min, h.sigma_max, h.rho)

    @contextmanager
    def evaluating(self, weights: str | None = None) -> Iterator[nn.Module]:
        """The named network (None: ``eval_weights``) in eval mode, its previous mode restored afterwards."""
        f = self.network(weights or self.hparams.eval_weights)
        was_training = f.training
        f.eval()
        try:
            yield f
        finally:
            f.train(was_training)

    def predict_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        """Images for a batch of sample indices (the DataModule's predict loader), seeded per index; a conditional
        model's classes from ``predict_labels``."""
        indices = batch.tolist()
        return self.sample_indexed(indices, self.hparams.predict_sampler, self.hparams.predict_seed,
                                   labels=self.labels_for_indices(indices))

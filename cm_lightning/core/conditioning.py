"""Class labels and classifier-free guidance, as small pure functions over any network or parametrisation.

Labels are integer tensors (B,) with values in [0, K) for K classes, or ``NULL_LABEL`` (−1) for "no label": the
unconditional branch that label dropout trains (Ho & Salimans 2022, "Classifier-free diffusion guidance") and
guidance reads. A network of K > 0 classes is called ``net(x, c_noise, class_labels)``; one of K = 0 (every model
before labels existed) as ``net(x, c_noise)``, exactly as before.

Guidance with scale w (Ho & Salimans eq. 6, in EDM2's convention where w = 1 is the plain conditional model):
    D_w(x, σ, c) = D(x, σ, ∅) + w (D(x, σ, c) − D(x, σ, ∅)).
Every parametrisation here (EDM's D, the consistency f, TrigFlow's F) is c_skip x + c_out F_raw with coefficients
that do not depend on the label, so guiding the raw network output guides D, f and F alike.
"""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

NULL_LABEL = -1


def validate_labels(labels: Tensor, num_classes: int) -> Tensor:
    """``labels`` as a 1-d long tensor, refused by value unless every entry lies in [0, K) or is ``NULL_LABEL``
    (for labels a user gives; it reads them on the host, so training steps do not call it)."""
    labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() != 1:
        raise ValueError(f"class labels must be a 1-d integer tensor, got dtype {labels.dtype} and shape {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < NULL_LABEL or int(labels.max()) >= num_classes):
        raise ValueError(f"class labels must lie in [0, {num_classes}) or be {NULL_LABEL} (no label), "
                         f"got values from {int(labels.min())} to {int(labels.max())}")
    return labels.long()


def drop_labels(labels: Tensor, rate: float, generator: torch.Generator | None = None) -> Tensor:
    """Label dropout: each label replaced by ``NULL_LABEL`` with probability ``rate`` (torch's RNG, or
    ``generator``), so one network learns the conditional and the unconditional model."""
    if not 0 <= rate <= 1:
        raise ValueError(f"label dropout must lie in [0, 1], got {rate}")
    if rate == 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device if generator is None else generator.device)
    return torch.where(drop.to(labels.device) < rate, torch.full_like(labels, NULL_LABEL), labels)


def call_network(net: Callable, x: Tensor, c_noise: Tensor, labels: Tensor | None, guidance_scale: float = 1.0) -> Tensor:
    """F(x, c_noise[, labels]) with classifier-free guidance F_∅ + w (F_c − F_∅) when w ≠ 1: the conditional and
    the unconditional branch run as one batch of 2B (one forward, as the official guided samplers do). Without
    labels the network is called as an unconditional one, and guidance is refused."""
    if labels is None:
        if guidance_scale != 1.0:
            raise ValueError(f"guidance_scale={guidance_scale} needs class labels (a class-conditional network)")
        return net(x, c_noise)
    if guidance_scale == 1.0:
        return net(x, c_noise, labels)
    c_noise = c_noise.reshape(-1).expand(len(x)) if c_noise.numel() == 1 else c_noise  # (one σ for the batch)
    out = net(torch.cat([x, x]), torch.cat([c_noise, c_noise]), torch.cat([labels, torch.full_like(labels, NULL_LABEL)]))
    conditional, unconditional = out.float().chunk(2)  # combined in float32: w > 1 extrapolates bf16's rounding too
    return unconditional + guidance_scale * (conditional - unconditional)


def bind_labels(f: Callable, labels: Tensor | None, guidance_scale: float = 1.0) -> Callable[[Tensor, Tensor], Tensor]:
    """f(x, σ) with the labels (and guidance) fixed, for code that calls a network as f(x, σ) (objectives, the ODE
    step, samplers); f itself when there are no labels, so unconditional code paths are untouched."""
    if labels is None and guidance_scale == 1.0:
        return f
    return lambda x, sigma: f(x, sigma, class_labels=labels, guidance_scale=guidance_scale)


def balanced_labels(indices: Sequence[int] | Tensor, num_classes: int) -> Tensor:
    """Label i mod K of image i: any run of K consecutive indices holds every class once, so N images drawn by
    index (FID, ``predict``) are class-balanced on any number of ranks."""
    return torch.as_tensor(indices, dtype=torch.long) % num_classes


def labels_for_indices(indices: Sequence[int] | Tensor, num_classes: int, spec: str | int | Sequence[int] | None) -> Tensor:
    """The label of each sample index under a ``predict_labels`` value: None or "all": balanced (i mod K); a list
    of classes: cycled over the indices ([7]: every image a seven); an int n: n images per class, class by class
    (i // n), for indices below K·n."""
    indices = torch.as_tensor(indices, dtype=torch.long)
    if spec is None or spec == "all":
        return balanced_labels(indices, num_classes)
    if isinstance(spec, int):
        if indices.numel() and int(indices.max()) >= spec * num_classes:
            raise ValueError(f"predict_labels={spec} (images per class) covers {spec * num_classes} images, but index "
                             f"{int(indices.max())} was asked for: set --data.predict_num_samples {spec * num_classes}")
        return indices // spec
    classes = torch.as_tensor(list(spec), dtype=torch.long)
    return classes[indices % len(classes)]


def validate_label_spec(spec, num_classes: int) -> None:
    """Refuse a ``predict_labels`` value naming what is accepted: None, "all", an int >= 1, or a non-empty list
    of classes in [0, K); any of them only for a class-conditional model (K > 0)."""
    if spec is None:
        return
    if num_classes == 0:
        raise ValueError(f"predict_labels={spec!r} needs a class-conditional network (num_classes > 0); this one has none")
    if spec == "all":
        return
    if isinstance(spec, bool) or not isinstance(spec, (int, list, tuple)):
        raise ValueError(f"predict_labels must be 'all', an int (images per class) or a list of classes, got {spec!r}")
    if isinstance(spec, int):
        if spec < 1:
            raise ValueError(f"predict_labels as images per class must be >= 1, got {spec}")
        return
    if not spec or any(not isinstance(c, int) or not 0 <= c < num_classes for c in spec):
        raise ValueError(f"predict_labels as a list must hold classes in [0, {num_classes}), got {list(spec)}")

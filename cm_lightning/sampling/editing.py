"""Zero-shot editing with a consistency function f (CM paper Algorithm 4 and Appendix D; DESIGN §2.4).

Every edit is one replacement loop. A reference y, an orthogonal transform A and a mask Ω of the known
part (in A's coordinates) define replace(a, b) = Aᵀ[(A a)⊙Ω + (A b)⊙(1 − Ω)]: a's known part, b's rest.
Then y ← replace(y, 0); x ← replace(y, clamp(f(y + τ_1 z_1, τ_1))); and for each further τ_j:
x ← replace(y, clamp(f(x + √(τ_j² − σ_min²) z_j, τ_j))). The known part of the result is the
reference's exactly (to float rounding where A is not the identity).

    inpaint        A = I, Ω the pixels to keep
    colorize       A the orthogonal completion of the luminance vector (0.2989, 0.5870, 0.1140), Ω its channel
    super_resolve  A the orthogonal completion of the all-ones vector of each p×p patch, Ω the patch mean
    denoise        f(y, σ) of an image with noise level σ
    interpolate    slerp between two noises, then one step

No Trainer: ``f`` is any f(x, σ) (``module.network("ema")`` of a consistency module), images in [-1, 1].
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cm_lightning.core.karras import SIGMA_MIN

ConsistencyFn = Callable[[Tensor, Tensor], Tensor]
LUMINANCE = (0.2989, 0.5870, 0.1140)  # ITU-R 601 weights, as the reference code's colourisation


@dataclass(frozen=True)
class Constraint:
    """The known part of the images: an orthogonal map A (None: the identity) and the mask Ω in A's
    coordinates (1 = known, broadcast over the batch)."""

    keep: Tensor
    forward: Callable[[Tensor], Tensor] | None = None  # x ↦ A x
    inverse: Callable[[Tensor], Tensor] | None = None  # c ↦ Aᵀ c

    def replace(self, known: Tensor, other: Tensor) -> Tensor:
        """Aᵀ[(A known)⊙Ω + (A other)⊙(1 − Ω)]; with A = I the kept values are copied, bit for bit."""
        keep = self.keep.to(known.device).bool()
        if self.forward is None:
            return torch.where(keep, known, other)
        return self.inverse(torch.where(keep, self.forward(known), self.forward(other)))


def edit(
    f: ConsistencyFn, reference: Tensor, constraint: Constraint, sigmas: Sequence[float], noise: Tensor | None = None,
    generator: torch.Generator | None = None, sigma_min: float = SIGMA_MIN,
) -> Tensor:
    """The replacement loop (CM paper Algorithm 4) over the noise levels ``sigmas`` (decreasing).

    ``noise``: z_1, z_2, … stacked, shape (len(sigmas), *reference.shape); None draws it from ``generator``.
    """
    sigmas = [float(s) for s in sigmas]
    if not sigmas or any(s < sigma_min for s in sigmas) or any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f"sigmas must be a non-empty decreasing list of noise levels >= σ_min = {sigma_min}, got {sigmas}")
    if noise is None:
        noise = torch.randn((len(sigmas), *reference.shape), generator=generator).to(reference.device)
    if noise.shape != (len(sigmas), *reference.shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}; this edit needs {(len(sigmas), *reference.shape)}")
    ones = reference.new_ones(len(reference))
    y = constraint.replace(reference, torch.zeros_like(reference))
    x = y + sigmas[0] * noise[0]
    for j, tau in enumerate(sigmas):
        if j:
            x = x + math.sqrt(tau**2 - sigma_min**2) * noise[j]
        x = constraint.replace(y, f(x, tau * ones).clamp(-1, 1))
    return x


# -- the transforms ---------------------------------------------------------------------------------


def orthogonal_completion(v: Sequence[float]) -> Tensor:
    """An orthogonal matrix Q (float64) whose first column is v/‖v‖ (QR of [v | e_2 | … | e_n], signed so)."""
    v = torch.as_tensor(v, dtype=torch.float64)
    m = torch.eye(len(v), dtype=torch.float64)
    m[:, 0] = v / v.norm()
    q, _ = torch.linalg.qr(m)
    return q if q[:, 0].sum() > 0 else -q


def luminance_constraint(channels: int) -> Constraint:
    """Colourisation: A = Qᵀ with Q's first column the unit luminance vector; Ω keeps that coordinate."""
    if channels != 3:
        raise ValueError(f"colourisation needs a 3-channel (RGB) model, this one has {channels} channel(s)")
    q = orthogonal_completion(LUMINANCE).float()
    keep = torch.zeros(3, 1, 1)
    keep[0] = 1
    return Constraint(keep, lambda x: torch.einsum("bchw,cd->bdhw", x, q.to(x)), lambda c: torch.einsum("bdhw,cd->bchw", c, q.to(c)))


def patch_mean_constraint(image_size: int, patch: int) -> Constraint:
    """Super-resolution: per p×p patch, A = Qᵀ with Q's first column the unit all-ones vector (the patch
    mean times p); Ω keeps that coordinate of every patch."""
    if patch < 1 or image_size % patch:
        raise ValueError(f"the super-resolution factor must divide the image size {image_size}, got {patch}")
    q = orthogonal_completion([1.0] * patch**2).float()
    keep = torch.zeros(1, patch**2, 1, 1, 1)  # (B, p², C, H/p, W/p) coordinates: the first of each patch
    keep[0, 0] = 1

    def to_patches(x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, p², C, H/p, W/p)
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 3, 5, 1, 2, 4)
        return x.reshape(b, patch**2, c, h // patch, w // patch)

    def from_patches(x: Tensor) -> Tensor:
        b, _, c, h, w = x.shape
        x = x.reshape(b, patch, patch, c, h, w).permute(0, 3, 4, 1, 5, 2)
        return x.reshape(b, c, h * patch, w * patch)

    return Constraint(
        keep,
        lambda x: torch.einsum("bkchw,kd->bdchw", to_patches(x), q.to(x)),
        lambda c: from_patches(torch.einsum("bdchw,kd->bkchw", c, q.to(c))),
    )


# -- the edits ---------------------------------------------------------------------------------------


def inpaint(f: ConsistencyFn, reference: Tensor, keep: Tensor, sigmas: Sequence[float], **kwargs) -> Tensor:
    """Fill the pixels where ``keep`` is 0 (``keep``: (H, W), (1 or C, H, W) or (B, C, H, W); 1 = known)."""
    if keep.shape[-2:] != reference.shape[-2:]:
        raise ValueError(f"the mask is {tuple(keep.shape[-2:])} pixels but the images are {tuple(reference.shape[-2:])}")
    return edit(f, reference, Constraint(keep.bool()), sigmas, **kwargs)


def colorize(f: ConsistencyFn, reference: Tensor, sigmas: Sequence[float], **kwargs) -> Tensor:
    """Colour images whose luminance is the reference's (the reference may be grey or in colour)."""
    return edit(f, reference, luminance_constraint(reference.shape[1]), sigmas, **kwargs)


def super_resolve(f: ConsistencyFn, reference: Tensor, patch: int, sigmas: Sequence[float], **kwargs) -> Tensor:
    """Images whose p×p patch means are the reference's (a low-resolution image upsampled to the model's size)."""
    return edit(f, reference, patch_mean_constraint(reference.shape[-1], patch), sigmas, **kwargs)


def denoise(f: ConsistencyFn, noisy: Tensor, sigma: float, sigma_min: float = SIGMA_MIN) -> Tensor:
    """f(y, σ): one step from an image with Gaussian noise of standard deviation σ (in [-1, 1] units)."""
    if sigma < sigma_min:
        raise ValueError(f"the noise level must be >= σ_min = {sigma_min}, got {sigma}")
    return f(noisy, noisy.new_full((len(noisy),), float(sigma))).clamp(-1, 1)


def slerp(z0: Tensor, z1: Tensor, alpha: float) -> Tensor:
    """Spherical interpolation per sample: sin((1 − α)θ)/sin θ · z0 + sin(αθ)/sin θ · z1."""
    if alpha == 0:
        return z0
    if alpha == 1:
        return z1
    a, b = z0.flatten(1).double(), z1.flatten(1).double()
    cos = ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).clamp(-1, 1)
    theta = torch.arccos(cos).reshape(-1, *[1] * (z0.dim() - 1))
    out = (torch.sin((1 - alpha) * theta) * z0.double() + torch.sin(alpha * theta) * z1.double()) / torch.sin(theta)
    return out.to(z0.dtype)


def interpolate(f: ConsistencyFn, z0: Tensor, z1: Tensor, alphas: Sequence[float], sigma_max: float = 80.0) -> Tensor:
    """One-step samples f(σ_max · slerp(z0, z1, α), σ_max) for each α: shape (len(alphas), B, C, H, W).
    α = 0 and 1 are exactly the one-step samples of z0 and z1."""
    ones = z0.new_ones(len(z0))
    return torch.stack([f(sigma_max * slerp(z0, z1, a), sigma_max * ones).clamp(-1, 1) for a in alphas])


# -- a batch of edits (what ``cm-lightning predict --edit.kind ...`` runs) -----------------------------

EDITS = ("inpaint", "colorize", "super_resolve", "denoise", "interpolate")


@dataclass  # (not frozen: Lightning moves batches, task included, with apply_to_collection, which refuses frozen ones)
class EditTask:
    """One kind of edit with its settings, applied to batches the edit DataModule prepares.

    kind: one of EDITS; sigmas: the replacement loop's noise levels (inpaint, colorize, super_resolve);
    factor: super-resolution patch side p; noise_level: σ of ``denoise``'s inputs, whose noise is added here
    unless ``add_noise`` is False (inputs that are noisy already); alphas: the slerp
    weights of ``interpolate``; sigma_max: its one-step level.
    """

    kind: str
    sigmas: tuple[float, ...] = (80.0,)
    factor: int = 4
    noise_level: float = 0.5
    add_noise: bool = True
    alphas: tuple[float, ...] = (0.0, 0.5, 1.0)
    sigma_max: float = 80.0

    def __post_init__(self):
        if self.kind not in EDITS:
            raise ValueError(f"the edit kind must be one of {EDITS}, got {self.kind!r}")

    @property
    def num_draws(self) -> int:
        """Noise draws per item: z_1 … z_J of the loop; the one noise of ``denoise``; z0 and z1 of ``interpolate``."""
        return {"denoise": 1, "interpolate": 2}.get(self.kind, len(self.sigmas))

    def constraint(self, batch: dict) -> Constraint:
        if self.kind == "inpaint":
            return Constraint(batch["keep"].bool())
        if self.kind == "colorize":
            return luminance_constraint(batch["reference"].shape[1])
        return patch_mean_constraint(batch["reference"].shape[-1], self.factor)

    def degrade(self, batch: dict) -> Tensor:
        """What the edit is given, as an image: the noisy image (denoise), the grey image of the luminance
        (colorize), else the known part with the rest zeroed (mid-grey pixels, or the patch means)."""
        reference = batch["reference"]
        if self.kind == "denoise":
            return reference + self.noise_level * batch["noise"][:, 0] if self.add_noise else reference
        if self.kind == "colorize":
            weights = torch.tensor(LUMINANCE, dtype=reference.dtype, device=reference.device).reshape(1, 3, 1, 1)
            return (reference * weights).sum(1, keepdim=True).expand_as(reference)
        return self.constraint(batch).replace(reference, torch.zeros_like(reference))

    @torch.no_grad()
    def __call__(self, f: ConsistencyFn, batch: dict, sigma_min: float = SIGMA_MIN) -> dict[str, Tensor]:
        """The results of one batch: ``{"index", "result", "reference", "degraded"}`` (``interpolate``: result
        (B, len(alphas), C, H, W) and no reference). ``batch["noise"]`` is (B, num_draws, C, H, W)."""
        noise = batch["noise"].transpose(0, 1)  # (num_draws, B, C, H, W)
        out = {"index": batch["index"]}
        if self.kind == "interpolate":
            out["result"] = interpolate(f, noise[0], noise[1], self.alphas, self.sigma_max).transpose(0, 1)
            return out
        degraded = self.degrade(batch)
        if self.kind == "denoise":
            result = denoise(f, degraded, self.noise_level, sigma_min)
        else:
            result = edit(f, batch["reference"], self.constraint(batch), self.sigmas, noise=noise, sigma_min=sigma_min)
        return out | {"result": result, "reference": batch["reference"], "degraded": degraded.clamp(-1, 1)}

"""ConsistencyTrainingModule: consistency training (CT / iCT) as a LightningModule.

The math lives in small functions (``karras``, ``recipes``, ``losses``,
``consistency``); this module only orchestrates: draw σ pairs for the global
step, compute the loss, log it, move the target network after each step. The
evaluation EMAs live here too (so checkpoints carry them); ``callbacks.EMAUpdate`` moves them.
"""

import copy
import hashlib
from collections.abc import Sequence
from typing import Literal

import torch
from lightning.pytorch import Callback, LightningModule, seed_everything
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from cm_lightning.consistency import ConsistencyFunction, indexed_noise, multistep_sample, validate_sampling_sigmas
from cm_lightning.ema import validate_decays
from cm_lightning.karras import karras_sigmas, validate_sigma_range
from cm_lightning.losses import METRICS
from cm_lightning.lr_schedules import CosineDecay
from cm_lightning.recipes import DEFAULTS, make_recipe
from cm_lightning.unet import UNet


NETWORK_SHAPE = ("image_size", "channels", "model_channels", "channel_mult", "num_res_blocks", "attn_resolutions", "embedding_type")


class ConsistencyTrainingModule(LightningModule):
    """Consistency training of f_θ from data alone (CM paper Algorithm 3; iCT)."""

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 3,
        model_channels: int = 128,
        channel_mult: list[int] = [2, 2, 2],
        num_res_blocks: int = 4,
        attn_resolutions: list[int] = [16],
        dropout: float = 0.0,
        embedding_type: Literal["fourier", "positional"] = "fourier",
        recipe: Literal["ct", "ict"] = "ict",
        loss: Literal["l2", "l1", "pseudo_huber"] | None = None,
        s0: int | None = None,
        s1: int | None = None,
        mu0: float = 0.9,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        total_steps: int | None = None,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        rho: float = 7.0,
        val_num_scales: int = 40,
        ema_decays: list[float] = [0.9999],
        ema_warmup: bool = False,
        eval_weights: str = "ema",
        predict_sigmas: list[float] = [80.0],
        predict_seed: int = 0,
        clip_denoised: bool = True,
        compile: bool = False,
        on_nonfinite: Literal["stop", "skip"] = "stop",
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        """
        Args:
            image_size: side of the square images; linked from the DataModule by the CLI.
            channels: image channels (1 or 3); linked from the DataModule by the CLI.
            model_channels: UNet base width (128 in the papers' CIFAR-10 net).
            channel_mult: width multiplier per resolution level; the net halves the image len-1 times.
            num_res_blocks: residual blocks per level (4 in the papers' CIFAR-10 net).
            attn_resolutions: resolutions (pixels per side) that get self-attention.
            dropout: dropout rate in the residual blocks (iCT uses 0.3 on CIFAR-10).
            embedding_type: noise embedding of c_noise(σ): NCSN++ "fourier" or DDPM++ "positional".
            recipe: "ct" (Song et al. 2023: N(k) from s0 = 2 to s1 = 150, target EMA μ(k), squared L2) or
                "ict" (Song & Dhariwal 2023: N(k) doubling from 10 to 1280, no target EMA, pseudo-Huber,
                log-normal σ sampling, λ(σ_n) = 1/(σ_n+1 − σ_n)).
            loss: distance d; None takes the recipe's ("l2" for ct, "pseudo_huber" for ict).
            s0: initial discretisation steps; None takes the recipe's (ct 2, ict 10).
            s1: final discretisation steps; None takes the recipe's (ct 150, ict 1280).
            mu0: target EMA decay at the start of the ct curriculum.
            p_mean: mean of ln σ for the iCT index distribution.
            p_std: standard deviation of ln σ for the iCT index distribution.
            total_steps: K of the curriculum; None takes the Trainer's total optimizer steps.
            sigma_min: smallest noise level ε (boundary condition f(x, σ_min) = x).
            sigma_max: largest noise level T, where sampling starts.
            sigma_data: standard deviation of the data (images in [-1, 1]).
            rho: Karras discretisation exponent ρ.
            val_num_scales: the validation loss uses the fixed σ pairs of this Karras grid.
            ema_decays: decays β of the evaluation EMAs of the online weights (CM paper 0.9999, iCT 0.99993).
            ema_warmup: cap β at (1 + n) / (10 + n) after n updates, for short runs.
            eval_weights: weights for validation and sampling: "online", "ema" (the first decay) or "ema_<decay>".
            predict_sigmas: sampling schedule of ``cm-lightning predict``: [80.0] one step, [80.0, 0.8] two.
            predict_seed: noise seed of ``predict``; image i depends on (seed, i) only.
            clip_denoised: in multistep sampling (``sample``, grids, FID, ``predict``), clamp each step's
                output to [-1, 1] before adding the next noise, as the official code and diffusers do.
            compile: compile the networks with ``torch.compile`` for training and sampling (weights and
                checkpoints unchanged); the first steps are slow while it compiles.
            on_nonfinite: a non-finite training loss "stop"s the run (weights and checkpoints untouched) or
                "skip"s that step, counted in ``train/skipped_steps``.
            optimizer: optimizer factory; None is Adam(lr=1e-4), the iCT setting.
            lr_scheduler: optional LR schedule factory, stepped every optimizer step;
                ``cm_lightning.lr_schedules.CosineDecay`` without ``total_steps`` lasts as long as the run.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        validate_sigma_range(sigma_min, sigma_max, sigma_data, rho)
        if loss is not None and loss not in METRICS:
            raise ValueError(f"loss must be one of {tuple(METRICS)} or None, got {loss!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be >= 1 or None, got {total_steps}")
        if val_num_scales < 2:
            raise ValueError(f"val_num_scales must be >= 2, got {val_num_scales}")
        validate_decays(ema_decays)
        self.recipe = make_recipe(recipe, s0, s1, mu0, p_mean, p_std)
        self.metric = METRICS[loss or DEFAULTS[recipe]["loss"]]
        net = UNet(image_size, channels, model_channels, channel_mult, num_res_blocks, attn_resolutions, dropout, embedding_type)
        self.online = ConsistencyFunction(net, sigma_min, sigma_data)
        # iCT's target is stop-gradient(θ): the online network itself, no copy (μ ≡ 0).
        self.target = copy.deepcopy(self.online).requires_grad_(False) if recipe == "ct" else None
        self.ema = nn.ModuleDict({str(i): copy.deepcopy(self.online).requires_grad_(False) for i in range(len(ema_decays))})
        self.network(eval_weights)  # refuse an unknown name now, not at the first validation
        validate_sampling_sigmas(predict_sigmas, sigma_min, sigma_max)
        if on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
        if not 0 <= predict_seed < 2**31:
            raise ValueError(f"predict_seed must lie in [0, 2**31), got {predict_seed}")
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self._total_steps = total_steps
        self._compiled = False
        self._skipped_steps = 0

    def network(self, weights: str) -> ConsistencyFunction:
        """The consistency function with the named weights: "online", "ema" or "ema_<decay>"."""
        names = {"online": self.online}
        if self.ema:
            names["ema"] = self.ema["0"]
        names |= {f"ema_{d}": self.ema[str(i)] for i, d in enumerate(self.hparams.ema_decays)}
        if weights not in names:
            raise ValueError(
                f"unknown weights {weights!r} (eval_weights, or weights= of sample/SampleGrid): choose one of {sorted(names)}"
            )
        return names[weights]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["run_seed"] = self._seed

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse, by name, a checkpoint of another network shape (before PyTorch's list of tensor sizes);
        a resumed ``fit`` goes on with the run's own seed, whatever seed the relaunch was given."""
        self._check_network_shape(checkpoint)
        seed = checkpoint.get("run_seed")
        if seed is not None and self._trainer is not None and self.trainer.state.fn == "fit" and seed != self._seed:
            rank_zero_info(f"Resuming with the run's seed {seed} (this launch was given {self._seed}).")
            seed_everything(seed, verbose=False)  # the data order reads it too (PL_GLOBAL_SEED)
            self._seed = seed

    def _check_network_shape(self, checkpoint: dict) -> None:
        saved = checkpoint.get("hyper_parameters", {})
        differ = [k for k in NETWORK_SHAPE if k in saved and saved[k] != self.hparams[k]]
        if "recipe" in saved and (saved["recipe"] == "ct") != (self.hparams.recipe == "ct"):
            differ.append("recipe")  # a target network θ⁻ or none
        if "ema_decays" in saved and len(saved["ema_decays"]) != len(self.hparams.ema_decays):
            differ.append("ema_decays")  # how many EMA copies
        if differ:
            raise ValueError(
                "the checkpoint was trained with other network settings: "
                + "; ".join(f"{k}: checkpoint {saved[k]!r}, model {self.hparams[k]!r}" for k in differ)
                + ". Build the model from the checkpoint (ConsistencyTrainingModule.load_from_checkpoint, or "
                "--ckpt_path with the CLI, which takes the checkpoint's settings)."
            )

    def configure_model(self) -> None:
        """``compile=True``: compile every network in place (``nn.Module.compile`` keeps the state-dict keys)."""
        if self.hparams.compile and not self._compiled:
            for f in [self.online, *([self.target] if self.target is not None else []), *self.ema.values()]:
                f.net.compile()
            self._compiled = True

    def check_sampling(self, schedules: Sequence[Sequence[float]], weights: str | None) -> None:
        """Refuse sampling schedules or a weights name this model cannot use (callbacks call it in ``setup``)."""
        for sigmas in schedules:
            validate_sampling_sigmas(sigmas, self.hparams.sigma_min, self.hparams.sigma_max)
        self.network(weights or self.hparams.eval_weights)

    def configure_callbacks(self) -> list[Callback]:
        """The module needs its EMA update and its non-finite guard to be correct, so it brings them itself."""
        from callbacks.ema import EMAUpdate  # callbacks import cm_lightning: import at call time
        from callbacks.nonfinite import NonFiniteGuard

        return [NonFiniteGuard()] + ([EMAUpdate()] if self.ema else [])

    # -- curriculum ---------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        for name in ("image_size", "channels"):
            if dm is not None and getattr(dm, name, self.hparams[name]) != self.hparams[name]:
                raise ValueError(f"the data has {name}={getattr(dm, name)} but the model has {name}={self.hparams[name]}")
        self._seed = torch.initial_seed()  # seed_everything's seed; a resumed run takes the checkpoint's
        if stage == "fit" and self.hparams.total_steps is None:
            self._total_steps = self._trainer_steps()

    def _trainer_steps(self) -> int:
        """The Trainer's total optimizer steps (``max_steps``, or what ``max_epochs`` implies)."""
        steps = self.trainer.estimated_stepping_batches
        if steps == float("inf"):
            raise ValueError("the Trainer has no end, so the curriculum and LR schedule have no length: "
                             "set --trainer.max_steps (or --model.total_steps and the schedule's total_steps)")
        return int(steps)

    def num_scales(self, k: int) -> int:
        """N(k) of the recipe at global step k (clamped to K)."""
        return self.recipe.num_scales(min(k, self._total_steps), self._total_steps)

    # -- loss ---------------------------------------------------------------------------------

    def consistency_loss(
        self, x: Tensor, z: Tensor, sigma_n: Tensor, sigma_next: Tensor, f: ConsistencyFunction | None = None
    ) -> Tensor:
        """λ(σ_n) d(f_θ(x + σ_{n+1} z, σ_{n+1}), f_θ⁻(x + σ_n z, σ_n)), averaged (CM eq. 10; iCT eq. 9).

        The target forward replays the student's RNG state, so with dropout both see the same mask.
        Given ``f``, both branches use it: the self-consistency of an evaluation network.
        """
        student_fn = f or self.online
        target_fn = f or (self.target if self.target is not None else self.online)
        device = x.device
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
            student = student_fn(x + _bcast(sigma_next) * z, sigma_next)
        with torch.no_grad():  # the RNG is back where the student's forward found it
            target = target_fn(x + _bcast(sigma_n) * z, sigma_n)
        return (self.recipe.weight(sigma_n, sigma_next) * self.metric(student, target)).mean()

    def training_step(self, batch: Tensor | Sequence[Tensor], batch_idx: int) -> Tensor:
        x = images_of(batch)
        num_scales = self.num_scales(self.global_step)
        sigmas = karras_sigmas(num_scales, self.hparams.sigma_min, self.hparams.sigma_max, self.hparams.rho)
        with torch.random.fork_rng(devices=[] if x.device.type == "cpu" else [x.device], device_type=x.device.type):
            torch.manual_seed(step_seed(self._seed, self.global_step, batch_idx, self.global_rank))
            sigma_n, sigma_next = (s.to(x.device, torch.float32) for s in self.recipe.draw_pairs(sigmas, len(x)))
            loss = self.consistency_loss(x, torch.randn_like(x), sigma_n, sigma_next)
        if not self._finite_on_all_ranks(loss):
            return self._nonfinite(loss, sigma_n, sigma_next)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/num_scales", float(num_scales))
        self.log("train/target_ema", self.recipe.target_ema(num_scales))
        return loss

    def _finite_on_all_ranks(self, loss: Tensor) -> bool:
        finite = torch.isfinite(loss.detach()).float()
        if self.trainer.world_size > 1:  # every rank must take the same branch, or DDP hangs
            finite = self.trainer.strategy.reduce(finite, reduce_op="min")
        return bool(finite.item())

    def _nonfinite(self, loss: Tensor, sigma_n: Tensor, sigma_next: Tensor) -> None:
        """No optimizer step for a non-finite loss: stop with what is known, or skip the step and count it."""
        if self.hparams.on_nonfinite == "skip":
            self.count_skipped_step()
            return None  # Lightning skips backward and the optimizer step, on every rank alike
        raise FloatingPointError(
            f"non-finite training loss ({loss.item()}) at global step {self.global_step}, with σ_n in "
            f"[{sigma_n.min().item():.4g}, {sigma_n.max().item():.4g}] and σ_n+1 up to {sigma_next.max().item():.4g}. "
            "The weights were not updated and the checkpoints on disk are intact. Try a lower learning rate, "
            "--trainer.precision 32-true, gradient clipping (--trainer.gradient_clip_val 1.0), or "
            "--model.on_nonfinite skip; resume with --ckpt_path last."
        )

    def count_skipped_step(self) -> None:
        self._skipped_steps += 1
        self.log("train/skipped_steps", float(self._skipped_steps))

    def on_validation_epoch_start(self) -> None:
        self._eval_seen = 0

    def on_test_epoch_start(self) -> None:
        self._eval_seen = 0

    def fixed_pair_loss(self, batch: Tensor | Sequence[Tensor]) -> Tensor:
        """CT loss of the ``eval_weights`` network on fixed σ pairs and noise: comparable across steps and runs.

        The i-th image of the epoch (in loader order) gets pair n = i mod (val_num_scales − 1) and noise
        seeded by i: the value does not depend on the batch size.
        """
        x = images_of(batch)
        index = torch.arange(self._eval_seen, self._eval_seen + len(x))
        self._eval_seen += len(x)
        sigmas = karras_sigmas(self.hparams.val_num_scales, self.hparams.sigma_min, self.hparams.sigma_max, self.hparams.rho)
        n = index % (len(sigmas) - 1)
        sigma_n, sigma_next = (s.to(x.device, torch.float32) for s in (sigmas[n], sigmas[n + 1]))
        z = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(int(i))) for i in index])
        return self.consistency_loss(x, z.to(x.device), sigma_n, sigma_next, self.network(self.hparams.eval_weights))

    def validation_step(self, batch: Tensor | Sequence[Tensor], batch_idx: int) -> None:
        self.log("val/loss", self.fixed_pair_loss(batch), prog_bar=True, sync_dist=True)

    def test_step(self, batch: Tensor | Sequence[Tensor], batch_idx: int) -> None:
        self.log("test/loss", self.fixed_pair_loss(batch), sync_dist=True)

    # -- optimisation -------------------------------------------------------------------------

    def configure_optimizers(self):
        params = self.online.parameters()
        optimizer = self.optimizer_factory(params) if self.optimizer_factory else torch.optim.Adam(params, lr=1e-4)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        if isinstance(scheduler, CosineDecay) and scheduler.follows_run:
            scheduler.total_steps = self._trainer_steps()
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """One optimizer step, then θ⁻ ← μ(k) θ⁻ + (1 − μ(k)) θ with k the step just taken (ct only)."""
        mu = self.recipe.target_ema(self.num_scales(self.global_step))
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.target is not None:
            with torch.no_grad():
                torch._foreach_lerp_(list(self.target.parameters()), list(self.online.parameters()), 1 - mu)

    # -- sampling -----------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        sigmas: Sequence[float] = (80.0,),
        generator: torch.Generator | None = None,
        weights: str | None = None,
        seed: int | None = None,
        first_index: int = 0,
        clip_denoised: bool | None = None,
    ) -> Tensor:
        """Draw ``num_samples`` images in [-1, 1], shape (N, C, H, W), with one step per σ in ``sigmas``.

        ``sigmas=(80.0,)`` is one-step generation; ``(80.0, 0.8)`` two steps (CM paper, Algorithm 1).
        Noise comes from ``generator`` (CPU or device), or, given ``seed``, per image: image
        ``first_index + j`` depends on (seed, index) alone, not on the batch it is drawn in.
        ``weights`` names the network ("online", "ema", "ema_<decay>"); None takes ``eval_weights``;
        ``clip_denoised`` (clamp between steps) None takes the module's setting.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if seed is not None and generator is not None:
            raise ValueError("give either generator= or seed=, not both")
        validate_sampling_sigmas(sigmas, self.hparams.sigma_min, self.hparams.sigma_max)
        if seed is not None:
            return self.sample_indexed(range(first_index, first_index + num_samples), sigmas, seed, weights, clip_denoised)
        device = generator.device if generator is not None else self.device
        noise = torch.randn(len(sigmas), num_samples, *self.image_shape, generator=generator, device=device)
        return self.sample_from_noise(noise, sigmas, weights, clip_denoised)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.hparams.channels, self.hparams.image_size, self.hparams.image_size

    def sample_indexed(
        self, indices: Sequence[int], sigmas: Sequence[float], seed: int, weights: str | None = None,
        clip_denoised: bool | None = None,
    ) -> Tensor:
        """Image ``indices[j]`` from the noise seeded by (seed, indices[j]): batch- and rank-free sampling."""
        noise = indexed_noise(seed, indices, len(sigmas), self.image_shape)
        return self.sample_from_noise(noise, sigmas, weights, clip_denoised)

    @torch.no_grad()
    def sample_from_noise(
        self, noise: Tensor, sigmas: Sequence[float], weights: str | None = None, clip_denoised: bool | None = None
    ) -> Tensor:
        """Images from given noise (len(sigmas), B, C, H, W): the sampler behind ``sample`` and ``predict``."""
        f = self.network(weights or self.hparams.eval_weights)
        clip = self.hparams.clip_denoised if clip_denoised is None else clip_denoised
        was_training = f.training
        f.eval()
        try:
            return multistep_sample(f, noise.to(self.device), sigmas, self.hparams.sigma_min, clip)
        finally:
            f.train(was_training)

    def predict_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        """Images for a batch of sample indices (the DataModule's predict loader), seeded per index."""
        return self.sample_indexed(batch.tolist(), self.hparams.predict_sigmas, self.hparams.predict_seed)


def images_of(batch: Tensor | Sequence[Tensor]) -> Tensor:
    """Accept bare image batches and (image, label) pairs."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def step_seed(seed: int, step: int, batch_idx: int, rank: int) -> int:
    """The seed of one training batch's σ indices, noise z and dropout masks.

    A function of (run seed, global step, batch index, rank) alone: DDP ranks draw different noise, and
    a run resumed from a checkpoint draws exactly what the uninterrupted run drew.
    """
    digest = hashlib.blake2b(repr((seed, step, batch_idx, rank)).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")  # 32 bits: all a CPU generator keeps of its seed


def _bcast(sigma: Tensor) -> Tensor:
    return sigma.reshape(-1, 1, 1, 1)

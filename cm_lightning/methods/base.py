"""GenerativeModule: the contract of a training method, and the Lightning hooks every method shares.

A method implements ``wrap`` (its parametrisation of the network), ``losses`` and ``validation_loss``, and
``target_decay`` if it keeps a target θ⁻. The base class holds the network built from ``net``, the
evaluation EMAs and the seeded training step, and lists every Lightning hook it overrides in one place
below; each concern it wires in has its own home: sampling (``sampling.sampling_module``), the checkpoint
guard (``core.structure``), the non-finite policy (``core.nonfinite``), EMAs (``core.ema``), compile
(``core.compile``) and old checkpoint files (``io.upgrade``).
"""

import copy
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from lightning.pytorch import Callback, LightningModule, seed_everything
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from cm_lightning.core.compile import compile_networks
from cm_lightning.core.conditioning import validate_label_spec
from cm_lightning.core.ema import ema_decay, update_averages, validate_decays, weights_keys
from cm_lightning.core.karras import validate_sigma_range
from cm_lightning.core.lr_schedules import CosineDecay
from cm_lightning.core.noise import seeded_rng, step_seed
from cm_lightning.core.nonfinite import ON_DEVICE, POLICIES, NonFiniteGuard, finite_on_all_ranks, nonfinite_loss
from cm_lightning.core.structure import module_structure, structure_refusal
from cm_lightning.io.module_paths import imported_class, with_canonical_net
from cm_lightning.nets.contract import build_network, network_config, num_classes_of, with_net_defaults
from cm_lightning.sampling.sampling_module import Sampling, SamplerSpec

INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"  # Lightning's, on its allowlist


class GenerativeModule(Sampling, LightningModule):
    """Base class of every method: network, EMAs, sampling, predict, checkpoints, seeded steps."""

    def __init__(
        self,
        net: nn.Module | None = None,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float | Literal["data"] = 0.5,
        rho: float = 7.0,
        ema_decays: list[float] = [0.9999],
        ema_warmup: bool = False,
        eval_weights: str = "ema",
        predict_sampler: SamplerSpec | None = None,
        predict_seed: int = 0,
        predict_labels: int | list[int] | Literal["all"] | None = None,
        clip_denoised: bool = True,
        compile: bool | Literal["regional"] = False,
        on_nonfinite: Literal["stop", "skip", "skip_on_device"] = "stop",
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        """
        Args:
            net: the network F(c_in x, c_noise), any nn.Module with ``image_size`` and ``channels`` arguments
                (linked from the data by the CLI) and attributes (``nets.contract``); default ``cm_lightning.UNet``.
            sigma_min: smallest noise level σ_min (consistency models: f(x, σ_min) = x).
            sigma_max: largest noise level σ_max, where sampling starts.
            sigma_data: σ_data, the data's spread around 0 (images in [-1, 1]) that EDM's scalings assume; the CLI
                takes "data" as the RMS of the training images' pixels, computed once and saved as a number.
            rho: Karras discretisation exponent ρ.
            ema_decays: decays β of the evaluation EMAs of the online weights (CM paper 0.9999, iCT 0.99993).
            ema_warmup: cap β at (1 + n) / (10 + n) after n updates, for short runs.
            eval_weights: weights for validation and sampling: "online", "ema" (the first decay) or "ema_<decay>".
            predict_sampler: sampler of ``cm-lightning predict``: a σ list ([80.0] one step, [80.0, 0.8] two)
                or "heun<N>" / "euler<N>" (the probability-flow ODE); None: the method's default.
            predict_seed: noise seed of ``predict``; image i depends on (seed, i) only.
            predict_labels: classes of ``predict`` (and of edits) for a class-conditional network: "all" or None
                (balanced: image i gets class i mod K), a list of classes cycled over the images ([7]: all sevens),
                or an int n: n images of each class in turn (with --data.predict_num_samples n·K).
            clip_denoised: in multistep consistency sampling (``sample``, grids, FID, ``predict``), clamp each
                step's output to [-1, 1] before adding the next noise, as the official code and diffusers do.
            compile: compile the networks with ``torch.compile`` for training and sampling (weights and
                checkpoints unchanged); the first steps are slow while it compiles. "regional" compiles each
                repeated block (the UNet's residual blocks) instead of the whole network: blocks of one kind share
                their compiled code, so the first step comes much sooner (``core.compile``).
            on_nonfinite: a non-finite training loss "stop"s the run (weights and checkpoints untouched) or
                "skip"s that step, counted in ``train/skipped_steps``; both decide on the host each step.
                "skip_on_device" decides on the device (no host read in the step, for GPU throughput): a step with
                non-finite gradients is dropped by a fused optimizer (``--model.optimizer.init_args.fused true``),
                the averages stay, and the run stops if a whole logging interval was dropped (``core.nonfinite``).
            optimizer: optimizer factory; None is Adam(lr=1e-4).
            lr_scheduler: optional LR schedule factory, stepped every optimizer step;
                ``cm_lightning.CosineDecay`` without ``total_steps`` lasts as long as the run.
        """
        super().__init__()
        with warnings.catch_warnings():  # a net object is replaced by its config below; the CLI gives a config
            warnings.filterwarnings("ignore", message=".*'net' is an instance of `nn.Module`")
            self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if sigma_data == "data":
            raise ValueError("sigma_data='data' is resolved by the cm-lightning CLI from the DataModule before the model "
                             "is built; in Python pass the number, e.g. datamodule.pixel_statistics()['rms']")
        validate_sigma_range(sigma_min, sigma_max, sigma_data, rho)
        validate_decays(ema_decays)
        if on_nonfinite not in POLICIES:
            raise ValueError(f"on_nonfinite must be one of {POLICIES}, got {on_nonfinite!r}")
        if not 0 <= predict_seed < 2**31:
            raise ValueError(f"predict_seed must lie in [0, 2**31), got {predict_seed}")
        net = build_network(net)
        validate_label_spec(predict_labels, num_classes_of(net))
        if isinstance(self.hparams.get("net"), dict):  # a config: record every argument it was built with
            self.hparams["net"] = with_net_defaults(dict(self.hparams), type(net))["net"]
        else:  # built in Python: keep its config, not the object
            self.hparams["net"] = network_config(net)
        self.online = self.wrap(net)
        self.target: nn.Module | None = None  # θ⁻ of a method that averages one (CT, CD with μ > 0); see target_decay
        self.ema = nn.ModuleDict({str(i): copy.deepcopy(self.online).requires_grad_(False) for i in range(len(ema_decays))})
        self.network(eval_weights)  # refuse an unknown name now, not at the first validation
        self.sampler(predict_sampler)  # and a bad predict sampler
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self._compiled, self._skipped_steps, self._seed = False, 0, torch.initial_seed()
        self._skipped_device, self._step_keep = torch.zeros(()), None  # ``skip_on_device``: count, this step's 0/1

    # -- what a method provides -------------------------------------------------------------

    def wrap(self, net: nn.Module) -> nn.Module:
        """The network in the method's parametrisation (f_θ or D_φ)."""
        raise NotImplementedError

    def losses(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Training losses of a clean batch at ``self.global_step`` (per sample, or their mean); noise from torch's
        RNG. ``labels``: the batch's classes for a class-conditional network (None otherwise), which every network
        the method calls on the batch (student, target, teacher) is conditioned on."""
        raise NotImplementedError

    def validation_loss(self, x: Tensor, index: Tensor, labels: Tensor | None = None) -> Tensor | None:
        """A loss on fixed noise levels and noise (image ``index[j]`` seeded by that index); None if unavailable."""
        raise NotImplementedError

    def target_decay(self) -> float:
        """μ of θ⁻ ← μ θ⁻ + (1 − μ) θ after the step just taken, for a method with a target network."""
        raise NotImplementedError

    def describe_step(self) -> str:
        """What a non-finite-loss message says about the step's noise levels."""
        return ""

    @classmethod
    def structure_of(cls, hparams: dict) -> dict:
        """The settings that decide the state dict's shapes, as recorded in (a checkpoint's) hyper-parameters;
        the network's class by its canonical path, whatever name the file or config gave it."""
        return module_structure(with_canonical_net(hparams))

    # -- what the base class offers a method ------------------------------------------------

    @property
    def num_classes(self) -> int:
        """K of a class-conditional network, 0 for an unconditional one (``nets.contract.num_classes_of``)."""
        return num_classes_of(self.online.net)

    def batch_of(self, batch: Tensor | Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
        """(images, labels) of a batch; labels only for a class-conditional model (an unconditional one ignores
        them), which refuses a batch without them."""
        x = images_of(batch)
        if not self.num_classes:
            return x, None
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise ValueError(f"the network is class-conditional (num_classes={self.num_classes}) but the data yields no "
                             "labels: use a labelled DataModule (MNIST, CIFAR-10, an image folder with class sub-folders)")
        labels = batch[1]
        if labels.dim() != 1 or len(labels) != len(x) or labels.is_floating_point():
            raise ValueError(f"class labels must be integers of shape ({len(x)},), one per image; got {labels.dtype} "
                             f"of shape {tuple(labels.shape)} (one-hot labels: pass their argmax)")
        return x, labels.to(x.device, torch.long)

    def network(self, weights: str) -> nn.Module:
        """The network with the named weights: "online", "ema" or "ema_<decay>"."""
        names = weights_keys(self.hparams.ema_decays)
        if weights not in names:
            raise ValueError(
                f"unknown weights {weights!r} (eval_weights, or weights= of sample/SampleGrid): choose one of {sorted(names)}"
            )
        return self.get_submodule(names[weights])

    def networks(self) -> list[nn.Module]:
        """Every parametrised network the module holds: online, EMAs and θ⁻ if there is one."""
        return [self.online, *self.ema.values(), *([self.target] if self.target is not None else [])]

    def averaged_networks(self) -> list[tuple[nn.Module, float]]:
        """Every (network, decay β) to move as θ_avg ← β θ_avg + (1 − β) θ after optimizer step k: the
        evaluation EMAs, and the target θ⁻ if the method has one."""
        k = self.global_step  # the step just taken: Lightning counts it once ``optimizer_step`` returns
        out = [(ema, ema_decay(d, k, self.hparams.ema_warmup)) for d, ema in zip(self.hparams.ema_decays, self.ema.values())]
        return out + ([(self.target, self.target_decay())] if self.target is not None else [])

    def structure(self) -> dict:
        """Settings that decide the shape of the state dict (compared when a checkpoint is loaded)."""
        return type(self).structure_of(self.hparams)

    def trainer_steps(self) -> int:
        """The Trainer's total optimizer steps (``max_steps``, or what ``max_epochs`` implies)."""
        steps = self.trainer.estimated_stepping_batches
        if steps == float("inf"):
            raise ValueError("the Trainer has no end, so the curriculum and LR schedule have no length: "
                             "set --trainer.max_steps (or --model.total_steps and the schedule's total_steps)")
        return int(steps)

    def fitting(self) -> bool:
        """Whether the module is attached to a Trainer that runs ``fit`` (not ``test``, not built in Python)."""
        return self._trainer is not None and self.trainer.state.fn == "fit"  # private: no public "is attached"

    def log_at_logging_steps(self, values: dict[str, float | Tensor]) -> None:
        """A training step's curriculum and diagnostic values, logged only at the steps the logger writes (every
        ``--trainer.log_every_n_steps``): a value logged between them is overwritten unseen, and each ``self.log``
        costs the host about a millisecond. ``train/loss``, which the progress bar shows, is logged every step."""
        if self._trainer is None:
            return  # built in Python, no Trainer: nothing to log to
        connector = getattr(self.trainer, "_logger_connector", None)  # private: Lightning's "does the logger write"
        if connector is None or connector.should_update_logs:
            self.log_dict(values)

    def count_skipped_step(self) -> None:
        """A step dropped by the non-finite policy ``skip`` (``train/skipped_steps``)."""
        self._skipped_steps += 1
        self.log("train/skipped_steps", float(self._skipped_steps))

    def keep_step(self, keep: Tensor) -> None:
        """``skip_on_device``: this step's 1 (its update stands) or 0 (dropped), a device tensor the averages are
        moved by; the dropped ones are counted on the device (``train/skipped_steps``)."""
        self._step_keep = keep
        self._skipped_device = self._skipped_device.to(keep.device) + (1 - keep)
        self.log("train/skipped_steps", self._skipped_device)

    @property
    def skipped_on_device(self) -> Tensor:
        """Steps dropped on the device so far in this process (``skip_on_device``)."""
        return self._skipped_device

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """Lightning's, also for checkpoints of cm-lightning 0.1 (upgraded in memory, see ``io.upgrade``); only a
        load that fails reads the file a second time to see whether it is one."""
        from cm_lightning.io.upgrade import is_legacy_file, upgraded_file  # (so `python -m` runs it unimported)

        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        except Exception:
            if not is_legacy_file(checkpoint_path):
                raise
        return super().load_from_checkpoint(upgraded_file(checkpoint_path), *args, **kwargs)

    # -- the Lightning hooks every method shares ----------------------------------------------

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy)):  # before any wrapping
            raise ValueError(
                f"--trainer.strategy {type(strategy).__name__} is not supported: the methods keep their evaluation EMAs, "
                "the target θ⁻ and a frozen teacher as whole copies of the network beside the trained one, which a "
                "sharded strategy would neither shard nor gather for sampling. What works: DDP (--trainer.strategy ddp, "
                "any number of GPUs and nodes) with a network that fits one device; --trainer.precision bf16-mixed and "
                "--trainer.accumulate_grad_batches to fit a larger network or batch in its memory")
        dm = getattr(self.trainer, "datamodule", None)
        for name, mine in (("channels", self.image_shape[0]), ("image_size", self.image_shape[1])):
            if dm is not None and getattr(dm, name, mine) != mine:
                raise ValueError(f"the data has {name}={getattr(dm, name)} but the model's network has {name}={mine}")
        classes = getattr(dm, "num_classes", None) if dm is not None and stage != "predict" else None
        if self.num_classes and classes is not None and classes != self.num_classes:
            fix = f"set --model.net.init_args.num_classes {classes}" if classes else \
                "a flat image folder: put the images in one sub-folder per class"
            raise ValueError(f"the network is conditioned on num_classes={self.num_classes} but the data has {classes} "
                             f"classes: {fix}")
        per_class, count = self.hparams.predict_labels, getattr(dm, "predict_num_samples", None)
        if stage == "predict" and isinstance(per_class, int) and count is not None and count != per_class * self.num_classes:
            raise ValueError(f"predict_labels={per_class} asks for {per_class} images of each of {self.num_classes} classes, "
                             f"but --data.predict_num_samples is {count}: set it to {per_class * self.num_classes} (a list "
                             f"such as [{per_class}] is class {per_class} for every image)")
        self._seed = torch.initial_seed()  # seed_everything's seed; a resumed run takes the checkpoint's

    def configure_model(self) -> None:
        """``compile=True``: compile every network in place (see ``core.compile``)."""
        if self.hparams.compile and not self._compiled:
            compile_networks(self.networks(), self.hparams.compile)
            self._compiled = True

    def configure_callbacks(self) -> list[Callback]:
        """The module needs its non-finite guard to be correct, so it brings it itself."""
        return [NonFiniteGuard()]

    def trained_parameters(self) -> list[nn.Parameter]:
        """What the optimizer trains: the online network F_θ (a method with parameters of its own adds them)."""
        return list(self.online.parameters())

    def configure_optimizers(self):
        params = self.trained_parameters()
        optimizer = self.optimizer_factory(params) if self.optimizer_factory else torch.optim.Adam(params, lr=1e-4)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        if isinstance(scheduler, CosineDecay) and scheduler.follows_run:
            scheduler.total_steps = self.trainer_steps()
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch: Tensor | Sequence[Tensor], batch_idx: int) -> Tensor | None:
        """The method's losses under the step's own seed (``core.noise.step_seed``); a non-finite loss stops
        the run or skips the step on every rank alike (``core.nonfinite``)."""
        x, labels = self.batch_of(batch)
        with seeded_rng(x.device, step_seed(self._seed, self.global_step, batch_idx, self.global_rank)):
            loss = (self.losses(x, labels) if labels is not None else self.losses(x)).mean()
        if self.hparams.on_nonfinite == ON_DEVICE:  # decided on the device from the gradients (NonFiniteGuard)
            self.log("train/loss", loss, prog_bar=True)
            return loss
        if not finite_on_all_ranks(loss, self.trainer):
            if self.hparams.on_nonfinite == "stop":
                raise nonfinite_loss(loss, self.global_step, self.describe_step())
            self.count_skipped_step()
            return None  # Lightning skips backward and the optimizer step, on every rank alike
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """The optimizer step, then every averaged network (EMAs, target θ⁻) moves, here and only here:
        once per real step (not per accumulated micro-batch, not for a skipped step)."""
        losses = []

        def closure():
            losses.append(optimizer_closure())
            return losses[-1]

        super().optimizer_step(epoch, batch_idx, optimizer, closure)
        if not (losses and losses[-1] is None):  # a skipped non-finite step: Lightning did not step, nothing moves
            update_averages(self.averaged_networks(), self.online, self._step_keep)  # (0 on the device: stays)
        self._step_keep = None

    def on_validation_epoch_start(self) -> None:
        self._eval_seen = 0

    def on_test_epoch_start(self) -> None:
        self._eval_seen = 0

    def validation_step(self, batch, batch_idx: int) -> None:
        self._log_eval_loss("val/loss", batch)

    def test_step(self, batch, batch_idx: int) -> None:
        self._log_eval_loss("test/loss", batch)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The run's seed, and the module's and the network's classes as they are named today: built in Python or
        by the CLI, every checkpoint is rebuilt the CLI's way, so ``--ckpt_path`` and ``load_from_checkpoint``
        take any of them, and a resumed 0.2 run writes today's names."""
        checkpoint["run_seed"] = self._seed
        hparams = checkpoint.setdefault("hyper_parameters", {})
        hparams["_class_path"] = f"{type(self).__module__}.{type(self).__qualname__}"
        hparams.setdefault("_instantiator", INSTANTIATOR)
        if "net" in hparams:
            hparams["net"] = with_canonical_net(hparams)["net"]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse, by name, a checkpoint of another structure (``core.structure``); a resumed ``fit`` goes on
        with the run's own seed, whatever seed the relaunch was given."""
        saved = file_network(checkpoint.get("hyper_parameters", {}))  # the file's network as it was built
        refusal = structure_refusal(type(self).structure_of(saved), self.structure(), type(self).__name__)
        if refusal:
            raise ValueError(refusal)
        seed = checkpoint.get("run_seed")
        if seed is not None and self.fitting() and seed != self._seed:
            rank_zero_info(f"Resuming with the run's seed {seed} (this launch was given {self._seed}).")
            seed_everything(seed, verbose=False)  # the data order reads it too (PL_GLOBAL_SEED)
            self._seed = seed

    def _log_eval_loss(self, name: str, batch) -> None:
        x, labels = self.batch_of(batch)
        index = torch.arange(self._eval_seen, self._eval_seen + len(x))
        self._eval_seen += len(x)
        loss = self.validation_loss(x, index, labels) if labels is not None else self.validation_loss(x, index)
        if loss is not None:  # None: the method cannot compute it here (CD without its teacher file)
            self.log(name, loss.mean(), prog_bar=name == "val/loss", sync_dist=True)


def file_network(hparams: dict) -> dict:
    """A file's hyper-parameters with its network as it was built: the class by its canonical path, the arguments
    the file does not name at their class's defaults (a file of an older version names fewer)."""
    hparams = with_canonical_net(hparams)
    path = hparams["net"].get("class_path") if isinstance(hparams.get("net"), dict) else None
    cls = imported_class(path) if isinstance(path, str) else None
    return hparams if cls is None else with_net_defaults(hparams, cls)


def images_of(batch: Tensor | Sequence[Tensor]) -> Tensor:
    """Accept bare image batches and (image, label) pairs."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch

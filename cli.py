"""The ``cm-lightning`` command: LightningCLI over every method (ConsistencyTrainingModule, DiffusionModule)
and any image DataModule.

    cm-lightning fit --config configs/mnist_quickstart.yaml
    cm-lightning predict --config configs/mnist_quickstart.yaml --ckpt_path last --writer.output_dir samples
    cm-lightning predict --config configs/mnist_quickstart.yaml --ckpt_path last --edit.kind inpaint \
        --edit.images docs/edit_inputs/mnist --writer.output_dir edits
"""

import os
import shutil
import signal
from pathlib import Path

from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback, instantiate_class
from jsonargparse import Namespace
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from callbacks import FinalCheckpoint, GracefulInterrupt, SampleWriter
from cm_lightning.methods.base import GenerativeModule
from cm_lightning.io.files import latest_checkpoint
from cm_lightning.io.upgrade import is_legacy_file
from datamodules import ImageDataModule
from datamodules.edit import Edit


class LRMonitor(LearningRateMonitor):
    """Lightning's LearningRateMonitor, silent instead of failing when the run has no logger."""

    def on_train_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


class SaveFitConfig(SaveConfigCallback):
    """Lightning's config saver, for ``fit`` only: ``test``/``predict`` leave no ``config.yaml`` behind."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)


# The run folder's default root; the logger's save_dir follows --trainer.default_root_dir while it is this.
RUNS = "runs"

# Settings that say how to use a trained network, not what it is: a value the user gave (on the command line or in
# a --config file) beats the checkpoint's; where the user gave none, the checkpoint's stands, not the default.
EVALUATION_ARGS = ("eval_weights", "predict_sampler", "predict_seed", "predict_labels", "clip_denoised", "val_num_scales",
                   "val_num_sigmas", "allow_teacher_change")
# The same for one class: a diffusion model's guidance is how it samples (for CD and sCD it is the teacher's guidance
# in training, which a checkpoint keeps like every other training setting).
EVALUATION_ARGS_OF = {"DiffusionModule": ("guidance_scale",)}
# Given on the command line, these beat the checkpoint's too (a moved teacher file; its hash is still checked).
PATH_ARGS = ("teacher",)


class ConsistencyCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The data decides the image geometry; the model is told, the user is not asked twice.
        parser.link_arguments("data.image_size", "model.init_args.net.init_args.image_size", apply_on="instantiate")
        parser.link_arguments("data.channels", "model.init_args.net.init_args.channels", apply_on="instantiate")
        parser.add_lightning_class_args(FinalCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 500})
        parser.add_lightning_class_args(SampleWriter, "writer")  # acts in `predict` only
        parser.add_class_arguments(Edit, "edit")  # `predict --edit.kind ...`: edit images instead of sampling

    def parse_arguments(self, parser, args) -> None:
        """Lightning's, also keeping what the user gave without the defaults (``_parse_ckpt_path`` needs it)."""
        super().parse_arguments(parser, args)
        self._given = args if isinstance(args, (dict, Namespace)) else parser.parse_args(args, defaults=False)

    def _parse_ckpt_path(self) -> None:
        """Before Lightning reads the checkpoint's hyper-parameters into the config: runs follow
        ``--trainer.default_root_dir``, ``--ckpt_path last`` is resolved, and a 0.1 checkpoint is refused
        with the command that converts it. Lightning then overwrites all ``model.*`` arguments with the
        checkpoint's (Lightning PR #21455 is open): the network must come from the file, but
        ``--model.predict_sampler`` and the other EVALUATION_ARGS must not be silently ignored."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return super()._parse_ckpt_path()
        cfg = self.config[subcommand]
        logger = _tensorboard(cfg.trainer.logger)
        if logger is not None and logger.init_args.save_dir == RUNS and cfg.trainer.default_root_dir:
            logger.init_args.save_dir = cfg.trainer.default_root_dir  # runs go where the user said
        if cfg.get("ckpt_path") == "last" and not (subcommand == "fit" and cfg.checkpoint.dirpath):
            self._use_latest_run(subcommand, cfg, logger)  # (a fixed checkpoint folder: Lightning finds last.ckpt itself)
        model = cfg.get("model")
        init_args = model.get("init_args", {}) if model is not None else {}
        given = (self._given.get(subcommand) or {}).get("model") or {}
        given = given.get("init_args") or {}  # (jsonargparse files ``--model.eval_weights`` under init_args)
        evaluation = EVALUATION_ARGS + EVALUATION_ARGS_OF.get(str((model or {}).get("class_path", "")).rpartition(".")[2], ())
        chosen = {k: init_args[k] for k in evaluation if k in given}
        chosen |= {k: init_args[k] for k in PATH_ARGS if init_args.get(k) is not None}
        overruled = {k: init_args[k] for k in given.keys() if "." not in k and k not in chosen
                     and not isinstance(init_args.get(k), (dict, Namespace))}
        try:
            super()._parse_ckpt_path()
        except (SystemExit, Exception):  # only then is the file read again, to explain a 0.1 checkpoint
            if is_legacy_file(cfg.get("ckpt_path")):
                raise ValueError(
                    f"{cfg.ckpt_path} was written by cm-lightning 0.1, before the network became --model.net. "
                    f"Convert it (the old file is kept): python -m cm_lightning.io.upgrade {cfg.ckpt_path} <new>.ckpt"
                ) from None
            raise
        for key, value in chosen.items():
            self.config[subcommand].model.init_args[key] = value
        loaded = self.config[subcommand].model.init_args
        for key, value in overruled.items():  # a training setting given beside a checkpoint: the file's stands, said aloud
            if key in loaded and loaded[key] != value:
                rank_zero_warn(f"--model.{key}={value} is ignored: {cfg.ckpt_path} was trained with {key}={loaded[key]}, "
                               "and a checkpoint keeps its training settings")

    def instantiate_classes(self) -> None:
        """Lightning's, once ``--model.sigma_data data`` is the number it stands for."""
        self._sigma_data_from_data()
        super().instantiate_classes()

    def _sigma_data_from_data(self) -> None:
        """``--model.sigma_data data``: σ_data is the RMS of the run's training pixels
        (``ImageDataModule.pixel_statistics``: EDM's scalings take σ_data as the data's spread around 0), computed
        once here from the run's DataModule and written into the config as a number, so the saved ``config.yaml``,
        the hyper-parameters and every checkpoint hold it. With ``--ckpt_path`` the file's number is used
        (Lightning has read the model's arguments from it by now)."""
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        init_args = (cfg.get("model") or {}).get("init_args") or {}
        if init_args.get("sigma_data") != "data":
            return
        dm = instantiate_class((), cfg.data.as_dict())
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # (a DDP run's other ranks start once it is on disk)
            dm.prepare_data()
        stats = dm.pixel_statistics()
        init_args.sigma_data = round(stats["rms"], 4)
        rank_zero_info(f"sigma_data from the data: {init_args.sigma_data} (RMS of {stats['images']} training images' "
                       f"pixels; their mean {stats['mean']:.4f}, standard deviation {stats['std']:.4f})")

    def _use_latest_run(self, subcommand: str, cfg, logger) -> None:
        """``--ckpt_path last``: the newest run's ``last.ckpt``; ``fit`` goes on logging into that run's folder.

        Lightning looks for "last" only in the new run's own (empty) checkpoint folder, so ``fit`` would
        start from scratch and ``test``/``predict`` would fail; a requeued job that always passes
        ``--ckpt_path last`` must pick up where it stopped.
        """
        if logger is not None:
            root = Path(logger.init_args.save_dir) / (logger.init_args.name or "lightning_logs")
        else:  # no logger in this command: look where a logged fit writes its runs
            root = Path(cfg.trainer.default_root_dir or RUNS) / "lightning_logs"
        last = latest_checkpoint(root)
        if last is None:
            if subcommand == "fit":
                return  # the first launch of a requeued job: Lightning starts from scratch
            raise FileNotFoundError(
                f"--ckpt_path last: no run under {root} has checkpoints/last.ckpt. Train one first, pass "
                "--trainer.default_root_dir <the fit's root>, or give the file: --ckpt_path <path>.ckpt"
            )
        cfg.ckpt_path = str(last)
        print(f"--ckpt_path last: {cfg.ckpt_path}")
        if subcommand == "fit":
            logger.init_args.version = int(last.parts[-3].removeprefix("version_"))
            # The same run goes on: overwrite its last.ckpt rather than start a last-v1.ckpt beside it,
            # which the next `--ckpt_path last` would not pick.
            cfg.checkpoint.enable_version_counter = False

    def before_predict(self) -> None:
        """With ``--edit.kind``, predict edits: the edit's DataModule replaces the data's predict loader, every
        input checked here, before the checkpoint's weights are loaded or anything is generated."""
        edit = self.config_init["predict"]["edit"]
        if edit.kind is not None:
            self.datamodule = edit.datamodule(self.model, self.datamodule.batch_size, self.datamodule.num_workers)

    def _run_subcommand(self, subcommand: str) -> None:
        """Run it; a launch that fails before its first optimizer step leaves no new, empty run folder."""
        if subcommand != "predict" and self.config_init[subcommand]["edit"].kind is not None:
            raise ValueError(f"--edit.kind works with `cm-lightning predict` only, not with `{subcommand}`")
        log_dir = next((Path(lg.log_dir) for lg in self.trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        created = [p for p in (log_dir, *log_dir.parents) if not p.exists()] if log_dir is not None else []
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            # Lightning has closed the logger by now; a folder with any checkpoint is never removed.
            if created and self.trainer.is_global_zero and self.trainer.global_step == 0 and log_dir.is_dir():
                if not any(log_dir.rglob("*.ckpt")):
                    shutil.rmtree(log_dir)
                    for folder in created[1:]:  # runs/lightning_logs, if this launch made them
                        if folder.is_dir() and not any(folder.iterdir()):
                            folder.rmdir()
            raise

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:  # (trainer.log_dir is a collective: ask rank zero's logger instead)
            folder = self.trainer.logger.log_dir if self.trainer.logger else self.trainer.default_root_dir
            last = self.trainer.checkpoint_callback.last_model_path if self.trainer.checkpoint_callback else ""
            print(f"Run folder: {folder}\nLast checkpoint: {last or '(none written)'}")


def _tensorboard(logger):
    """The logger's config when it is a TensorBoardLogger given as class_path/init_args, else None."""
    if hasattr(logger, "init_args") and logger.class_path.endswith("TensorBoardLogger"):
        return logger
    return None


def build_cli(args: list[str] | None = None, run: bool = True) -> ConsistencyCLI:
    """The CLI with the project's defaults; ``run=False`` parses and instantiates without a subcommand."""
    return ConsistencyCLI(
        GenerativeModule,
        ImageDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveFitConfig,
        trainer_defaults={
            "default_root_dir": RUNS,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": RUNS}},
            "callbacks": [LRMonitor(logging_interval="step"), GracefulInterrupt()],
            "plugins": {"class_path": "cm_lightning.io.files.AtomicCheckpointIO"},
        },
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of ``cm-lightning`` and ``python cli.py``. A ``fit`` stopped by SIGTERM has saved ``last.ckpt``
    and exits with status 143, as the signal's default action would, so that a supervisor restarts it."""
    cli = build_cli(args)
    if any(isinstance(c, GracefulInterrupt) and c.terminated for c in getattr(cli.trainer, "callbacks", ())):
        raise SystemExit(128 + signal.SIGTERM)


if __name__ == "__main__":
    main()

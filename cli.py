"""The ``cm-lightning`` command: LightningCLI over ConsistencyTrainingModule and any image DataModule.

    cm-lightning fit --config configs/mnist_quickstart.yaml --data.data_dir ../shared/data
    cm-lightning predict --config configs/mnist_quickstart.yaml --ckpt_path <file> --writer.output_dir samples
"""

from pathlib import Path

from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningCLI

from callbacks import FinalCheckpoint, GracefulInterrupt, SampleWriter
from cm_lightning import ConsistencyTrainingModule
from datamodules import ImageDataModule


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


# Settings that say how to use a trained network, not what it is: the user's value beats the checkpoint's.
EVALUATION_ARGS = ("eval_weights", "predict_sigmas", "predict_seed", "val_num_scales")


class ConsistencyCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The data decides the image geometry; the model is told, the user is not asked twice.
        parser.link_arguments("data.image_size", "model.image_size", apply_on="instantiate")
        parser.link_arguments("data.channels", "model.channels", apply_on="instantiate")
        parser.add_lightning_class_args(FinalCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 500})
        parser.add_lightning_class_args(SampleWriter, "writer")  # acts in `predict` only

    def _parse_ckpt_path(self) -> None:
        """Lightning overwrites all ``model.*`` arguments with the checkpoint's hyper-parameters (Lightning PR
        #21455 is open). The network must come from the file, but ``--model.predict_sigmas`` and the other
        EVALUATION_ARGS must not be silently ignored: keep the user's values of those."""
        model = self.config.get(self.config.get("subcommand") or "", {}).get("model")
        if model is None:
            return super()._parse_ckpt_path()
        chosen = {k: model[k] for k in EVALUATION_ARGS}
        super()._parse_ckpt_path()
        for key, value in chosen.items():
            self.config[self.config.subcommand].model[key] = value

    def before_instantiate_classes(self) -> None:
        if self.subcommand == "fit" and self.config.fit.ckpt_path == "last":
            self._resume_latest_run()

    def _resume_latest_run(self) -> None:
        """``--ckpt_path last``: continue the newest run's ``last.ckpt``, logging into the same version folder.

        Lightning looks for "last" only in the new run's own (empty) checkpoint folder and so would start
        from scratch; a requeued job that always passes ``--ckpt_path last`` must pick up where it stopped.
        """
        cfg = self.config.fit
        logger = cfg.trainer.logger
        if cfg.checkpoint.dirpath or not hasattr(logger, "init_args") or "TensorBoardLogger" not in logger.class_path:
            return  # a fixed checkpoint folder: Lightning finds last.ckpt there itself
        root = Path(logger.init_args.save_dir) / (logger.init_args.name or "lightning_logs")
        runs = {int(p.parts[-3].removeprefix("version_")): p for p in root.glob("version_*/checkpoints/last.ckpt")
                if p.parts[-3].removeprefix("version_").isdigit()}
        if runs:
            version = max(runs)
            cfg.ckpt_path = str(runs[version])
            logger.init_args.version = version
            # The same run goes on: overwrite its last.ckpt rather than start a last-v1.ckpt beside it,
            # which the next `--ckpt_path last` would not pick.
            cfg.checkpoint.enable_version_counter = False


def build_cli(args: list[str] | None = None, run: bool = True) -> ConsistencyCLI:
    """The CLI with the project's defaults; ``run=False`` parses and instantiates without a subcommand."""
    return ConsistencyCLI(
        ConsistencyTrainingModule,
        ImageDataModule,
        subclass_mode_data=True,
        trainer_defaults={
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs"}},
            "callbacks": [LRMonitor(logging_interval="step"), GracefulInterrupt()],
            "plugins": {"class_path": "cm_lightning.checkpoint_io.AtomicCheckpointIO"},
        },
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of ``cm-lightning`` and ``python cli.py``."""
    build_cli(args)


if __name__ == "__main__":
    main()

"""The frozen diffusion teacher of the distillation methods (CD, sCD), as a mixin of ``ConsistencyModule``.

The teacher D_φ is read from a DiffusionModule checkpoint (``io.teacher_file.read_diffusion_checkpoint``: weights
only, hashed, refused if its network is not the student's), frozen, kept out of the module's state (checkpoints
name it by path and hash; a resumed run refuses another file unless told), and moved to the student's device when
used. The student starts from the teacher's weights unless ``init_from`` says otherwise.
"""

import copy

from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from cm_lightning.core.compile import compile_networks
from cm_lightning.nets.preconditioning import EDMDenoiser


def refuse_unconditional_guidance(module, guidance_scale: float) -> None:
    """A teacher's guidance (CD, sCD) needs a class-conditional network; refused by name before any work."""
    if guidance_scale != 1.0 and not module.num_classes:
        raise ValueError(f"guidance_scale={guidance_scale} guides a class-conditional teacher, but the network "
                         f"{type(module.online.net).__name__} has num_classes=0 (UNet: --model.net.init_args.num_classes K, "
                         "the teacher's)")


class FrozenTeacher:
    """Mixin (before ``ConsistencyModule`` in the bases) for a module with ``teacher``, ``teacher_weights`` and
    ``allow_teacher_change`` hyper-parameters. ``teacher_required``: a run without a teacher file is refused (CD);
    otherwise it trains without one (sCT)."""

    teacher_required = True
    _teacher: EDMDenoiser | None = None  # not a submodule: never in the state dict, the optimizer or DDP
    _teacher_sha256: str | None = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        wanted = self.teacher_required or self.hparams.teacher is not None
        if stage == "fit" and wanted:
            self.load_teacher()
        elif stage in ("validate", "test") and wanted and self._teacher is None:
            try:
                self.load_teacher()
            except FileNotFoundError as err:
                rank_zero_warn(f"{err}. The {stage} loss needs the teacher and is not logged; FID is unaffected.")

    def load_teacher(self) -> None:
        """Read the teacher file, refuse another network than the student's, freeze it."""
        if self.hparams.teacher is None:
            raise ValueError(f"{type(self).__name__} needs a teacher: --model.teacher <DiffusionModule last.ckpt>")
        found = self.read_diffusion_file(self.hparams.teacher, self.hparams.teacher_weights, "teacher")
        guidance = self.hparams.guidance_scale
        if guidance != 1.0 and not found.hparams.get("label_dropout", 0.0):
            raise ValueError(f"guidance_scale={guidance} guides the teacher {self.hparams.teacher!r}, which was trained "
                             "without label dropout: its unconditional branch (no label) never learned anything to guide "
                             "from. Distil a teacher trained with --model.label_dropout 0.1, or --model.guidance_scale 1")
        teacher = EDMDenoiser(copy.deepcopy(self.online.net), found.hparams.get("sigma_data", 0.5))
        teacher.net.load_state_dict(found.net_state)
        if self.hparams.compile:
            compile_networks([teacher], self.hparams.compile)
        object.__setattr__(self, "_teacher", teacher.requires_grad_(False).eval())  # bypass nn.Module registration
        self._teacher_sha256 = found.sha256

    def starting_state(self) -> dict[str, Tensor] | None:
        """The student starts from the teacher's weights (or from ``init_from`` when given)."""
        state = super().starting_state()
        if state is None and self._teacher is not None:
            return self._teacher.net.state_dict()
        return state

    def teacher(self) -> EDMDenoiser:
        """The frozen teacher D_φ, on the student's device."""
        if self._teacher is None:
            raise RuntimeError("the teacher is not loaded: it is read when fit, validate or test starts (load_teacher())")
        if next(self._teacher.parameters()).device != self.device:
            self._teacher.to(self.device)
        return self._teacher

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.teacher_required or self._teacher_sha256 is not None:
            checkpoint["teacher_sha256"] = self._teacher_sha256

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        saved, now = checkpoint.get("teacher_sha256"), self._teacher_sha256
        if saved is None or now is None or saved == now:
            return
        message = (f"the teacher file {self.hparams.teacher!r} is not the one this run was distilled from "
                   f"(sha256 {saved[:12]}… in the checkpoint, {now[:12]}… on disk)")
        if self.fitting() and not self.hparams.allow_teacher_change:
            raise ValueError(f"{message}: restore that file, or resume from the new one on purpose with "
                             "--model.allow_teacher_change true")
        rank_zero_warn(message)

"""cm-lightning: consistency models (CT, iCT, CD, ECT) and their EDM diffusion teacher for PyTorch Lightning.

The package in wings, each standing on the ones before it: ``core`` (the math), ``nets`` and ``sampling``,
``io`` (checkpoint files), ``methods`` (one LightningModule per method). Every public name is importable
from here; files that name a module of 0.2 (``cm_lightning.unet.UNet``, …) still load (``io.module_paths``).
"""

from cm_lightning.io import module_paths

module_paths.install()

from cm_lightning.core.lr_schedules import CosineDecay  # noqa: E402
from cm_lightning.core.noise import indexed_noise  # noqa: E402
from cm_lightning.io.files import latest_checkpoint  # noqa: E402
from cm_lightning.methods.base import GenerativeModule  # noqa: E402
from cm_lightning.methods.consistency import ConsistencyModule  # noqa: E402
from cm_lightning.methods.consistency_training import ConsistencyTrainingModule  # noqa: E402
from cm_lightning.methods.diffusion import DiffusionModule  # noqa: E402
from cm_lightning.methods.distillation import ConsistencyDistillationModule  # noqa: E402
from cm_lightning.methods.easy_tuning import EasyConsistencyTuningModule  # noqa: E402
from cm_lightning.nets.preconditioning import ConsistencyFunction, EDMDenoiser  # noqa: E402
from cm_lightning.nets.unet import UNet  # noqa: E402
from cm_lightning.sampling.sampling_module import SamplingModule  # noqa: E402
from cm_lightning.sampling.samplers import ConsistencySampler, ODESampler, multistep_sample, parse_sampler  # noqa: E402

__all__ = [
    "ConsistencyDistillationModule", "ConsistencyFunction", "ConsistencyModule", "ConsistencySampler",
    "ConsistencyTrainingModule", "CosineDecay", "DiffusionModule", "EDMDenoiser", "EasyConsistencyTuningModule",
    "GenerativeModule", "ODESampler", "SamplingModule", "UNet", "indexed_noise", "latest_checkpoint",
    "multistep_sample", "parse_sampler",
]

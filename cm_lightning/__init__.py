"""cm-lightning: consistency models (CT, iCT, CD, ECT) and their EDM diffusion teacher for PyTorch Lightning.

The package in wings, each standing on the ones before it: ``core`` (the math), ``nets`` and ``sampling``,
``io`` (checkpoint files), ``methods`` (one LightningModule per method). Every public name is importable
from here; files that name a module of 0.2 (``cm_lightning.unet.UNet``, …) still load (``io.module_paths``).
"""

from cm_lightning.core.lr_schedules import CosineDecay
from cm_lightning.core.noise import indexed_noise
from cm_lightning.io import module_paths
from cm_lightning.io.files import latest_checkpoint
from cm_lightning.methods.base import GenerativeModule
from cm_lightning.methods.consistency import ConsistencyModule
from cm_lightning.methods.consistency_training import ConsistencyTrainingModule
from cm_lightning.methods.diffusion import DiffusionModule
from cm_lightning.methods.distillation import ConsistencyDistillationModule
from cm_lightning.methods.continuous_time import ContinuousConsistencyModule
from cm_lightning.methods.easy_tuning import EasyConsistencyTuningModule
from cm_lightning.nets.preconditioning import ConsistencyFunction, EDMDenoiser
from cm_lightning.nets.unet import UNet
from cm_lightning.sampling.sampling_module import SamplingModule
from cm_lightning.sampling.samplers import ConsistencySampler, ODESampler, multistep_sample, parse_sampler

__all__ = [
    "ConsistencyDistillationModule", "ConsistencyFunction", "ContinuousConsistencyModule", "ConsistencyModule", "ConsistencySampler",
    "ConsistencyTrainingModule", "CosineDecay", "DiffusionModule", "EDMDenoiser", "EasyConsistencyTuningModule",
    "GenerativeModule", "ODESampler", "SamplingModule", "UNet", "indexed_noise", "latest_checkpoint",
    "multistep_sample", "parse_sampler",
]

module_paths.install()

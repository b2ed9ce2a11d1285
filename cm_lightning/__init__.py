"""cm-lightning: consistency models (CT, iCT, CD, ECT) and their EDM diffusion teacher for PyTorch Lightning."""

from cm_lightning.base import GenerativeModule
from cm_lightning.networks import SamplingModule
from cm_lightning.checkpoint_io import latest_checkpoint
from cm_lightning.consistency import ConsistencyFunction, EDMDenoiser, indexed_noise, multistep_sample
from cm_lightning.diffusion import DiffusionModule
from cm_lightning.distillation import ConsistencyDistillationModule
from cm_lightning.family import ConsistencyModule
from cm_lightning.module import ConsistencyTrainingModule
from cm_lightning.tuning import EasyConsistencyTuningModule
from cm_lightning.sampling import ConsistencySampler, ODESampler, parse_sampler
from cm_lightning.unet import UNet

__all__ = [
    "ConsistencyDistillationModule", "ConsistencyFunction", "ConsistencyModule", "EasyConsistencyTuningModule", "ConsistencySampler", "ConsistencyTrainingModule", "DiffusionModule", "EDMDenoiser",
    "GenerativeModule", "ODESampler", "SamplingModule", "UNet", "indexed_noise", "latest_checkpoint",
    "multistep_sample", "parse_sampler",
]

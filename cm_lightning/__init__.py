"""cm-lightning: consistency models (CT and iCT) for PyTorch Lightning."""

from cm_lightning.checkpoint_io import latest_checkpoint
from cm_lightning.consistency import ConsistencyFunction, indexed_noise, multistep_sample
from cm_lightning.module import ConsistencyTrainingModule
from cm_lightning.unet import UNet

__all__ = ["ConsistencyFunction", "ConsistencyTrainingModule", "UNet", "indexed_noise", "latest_checkpoint", "multistep_sample"]

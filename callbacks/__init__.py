"""Callbacks for every method's runs: sample grids, FID, the predict writer, safe stops and checkpoints."""

from callbacks.checkpoint import FinalCheckpoint
from callbacks.fid import FID
from callbacks.interrupt import GracefulInterrupt
from callbacks.post_hoc_ema import PostHocEMA, PostHocEMASweep
from callbacks.sample_grid import SampleGrid
from callbacks.sample_writer import SampleWriter
from callbacks.step_search import StepSearch

__all__ = ["FID", "FinalCheckpoint", "GracefulInterrupt", "PostHocEMA", "PostHocEMASweep", "SampleGrid", "SampleWriter", "StepSearch"]

"""Callbacks for consistency-model runs: the evaluation-EMA update, sample grids, FID, the predict writer,
safe stops and checkpoints."""

from callbacks.checkpoint import FinalCheckpoint
from callbacks.ema import EMAUpdate
from callbacks.fid import FID
from callbacks.interrupt import GracefulInterrupt
from callbacks.sample_grid import SampleGrid
from callbacks.sample_writer import SampleWriter

__all__ = ["FID", "EMAUpdate", "FinalCheckpoint", "GracefulInterrupt", "SampleGrid", "SampleWriter"]

"""Callbacks for consistency-model runs: the evaluation-EMA update, sample grids, FID."""

from callbacks.ema import EMAUpdate
from callbacks.fid import FID
from callbacks.sample_grid import SampleGrid

__all__ = ["FID", "EMAUpdate", "SampleGrid"]

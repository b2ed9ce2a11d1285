"""Callbacks for consistency-model runs: the evaluation-EMA update and sample grids."""

from callbacks.ema import EMAUpdate
from callbacks.sample_grid import SampleGrid

__all__ = ["EMAUpdate", "SampleGrid"]

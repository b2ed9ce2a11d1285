"""Callbacks for consistency-model runs (evaluation EMA, sample grids, FID): see the open issues."""

"""Sampling: samplers as values (samplers), the ``SamplingModule`` contract the callbacks use and its
implementation (sampling_module), zero-shot editing (editing), and the search of few-step schedules
(schedule_search). Imports only ``core``."""

from cm_lightning.core.ode import edm_time_steps, ode_step
from cm_lightning.sampling.samplers import (ConsistencySampler, ODESampler, Sampler, multistep_sample, ode_sample,
                                            parse_sampler, validate_sampling_sigmas)

__all__ = ["ConsistencySampler", "ODESampler", "Sampler", "edm_time_steps", "multistep_sample", "ode_sample", "ode_step",
           "parse_sampler", "validate_sampling_sigmas"]

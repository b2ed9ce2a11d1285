"""Seeded randomness: which noise an image or a training batch gets, independent of batch size, rank count
and interruptions."""

import hashlib
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import Tensor


def indexed_noise(seed: int, indices: Sequence[int], num_draws: int, shape: Sequence[int]) -> Tensor:
    """Standard normal noise (num_draws, len(indices), *shape); image i's draws depend on (seed, i) alone.

    So image i starts from the same noise whatever the batch size, the number of ranks or the order of
    generation: FID and exported samples do not change (beyond float rounding) when a run moves to more GPUs.
    """
    if not 0 <= seed < 2**31:
        raise ValueError(f"seed must lie in [0, 2**31), got {seed}")
    noise = torch.empty(num_draws, len(indices), *shape)
    for j, i in enumerate(indices):
        if not 0 <= int(i) < 2**32:
            raise ValueError(f"sample indices must lie in [0, 2**32), got {int(i)}")
        # The CPU generator keeps 32 bits of its seed: shift the index by a seed-dependent offset, a
        # bijection on the indices of one seed, so no two images of a run share their noise.
        generator = torch.Generator().manual_seed((int(i) + seed * 0x9E3779B9) % 2**32)
        noise[:, j] = torch.randn(num_draws, *shape, generator=generator)
    return noise


def step_seed(seed: int, step: int, batch_idx: int, rank: int) -> int:
    """The seed of one training batch's noise levels, noise and dropout masks.

    A function of (run seed, global step, batch index, rank) alone: DDP ranks draw different noise, and
    a run resumed from a checkpoint draws exactly what the uninterrupted run drew.
    """
    digest = hashlib.blake2b(repr((seed, step, batch_idx, rank)).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")  # 32 bits: all a CPU generator keeps of its seed


def forked_rng(device: torch.device):
    """A block after which torch's RNG (CPU, and ``device``'s if it is another) is where it was: two passes run from
    the same state draw the same noise and dropout masks."""
    return torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type)


@contextmanager
def seeded_rng(device: torch.device, seed: int):
    """``forked_rng`` with its generators (CPU, and ``device``'s) seeded with ``seed`` inside: the draws of
    ``torch.manual_seed(seed)`` on those devices. ``torch.manual_seed`` would also seed every other generator of the
    process (every GPU's, left seeded after the block) and cost the host about 0.2 ms per step."""
    with forked_rng(device):
        torch.default_generator.manual_seed(seed)
        if device.type != "cpu":
            module = torch.get_device_module(device.type)
            if device.index is not None and hasattr(module, "device"):
                with module.device(device.index):
                    module.manual_seed(seed)
            else:
                module.manual_seed(seed)
        yield

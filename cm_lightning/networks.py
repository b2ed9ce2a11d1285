"""The ``net`` argument of every method, and the contract the callbacks rely on.

A network is any ``nn.Module`` F(c_in·x, c_noise) → image-shaped output whose ``__init__`` takes
``image_size`` and ``channels`` (the CLI links them from the data) and keeps them as attributes.
Checkpoints store it as plain data, {"class_path", "init_args"}, so they load with ``weights_only``.
"""

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from cm_lightning.sampling import Sampler
from cm_lightning.unet import UNet

SamplerSpec = list[float] | str


@runtime_checkable
class SamplingModule(Protocol):
    """What the callbacks (grids, FID, sample writer) rely on, for every method."""

    image_shape: tuple[int, int, int]

    def check_sampling(self, samplers: Sequence[SamplerSpec], weights: str | None) -> None: ...

    def sampler(self, spec: SamplerSpec | Sampler | None) -> Sampler: ...

    def sample(self, num_samples: int, sampler=None, generator=None, weights=None, seed=None, first_index=0) -> Tensor: ...


def network_config(net: nn.Module) -> dict:
    """A network's class and arguments as plain data, for ``hparams`` (and so ``load_from_checkpoint``)."""
    return {"class_path": f"{type(net).__module__}.{type(net).__qualname__}", "init_args": dict(getattr(net, "init_args", {}))}


def build_network(net: nn.Module | dict | None) -> nn.Module:
    """The network from an instance, a {"class_path", "init_args"} dict (as checkpoints store it), or None (UNet())."""
    if net is None:
        return UNet()
    if isinstance(net, dict):
        from lightning.pytorch.cli import instantiate_class

        return instantiate_class((), {"class_path": net["class_path"], "init_args": net.get("init_args", {})})
    if not isinstance(net, nn.Module):
        raise TypeError(f"net must be an nn.Module (or its class_path/init_args config), got {type(net).__name__}")
    return net

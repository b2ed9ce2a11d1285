"""The ``net`` argument of every method: what a network must be, and how it is kept in a checkpoint.

A network is any ``nn.Module`` F(c_in·x, c_noise) → image-shaped output whose ``__init__`` takes
``image_size`` and ``channels`` (the CLI links them from the data) and keeps them as int attributes.
Checkpoints store it as plain data, {"class_path", "init_args"}, so they load with ``weights_only``.
"""

import inspect
import sys

from torch import nn

from cm_lightning.nets.unet import UNet


def network_config(net: nn.Module) -> dict:
    """A network's class and arguments as plain data, for ``hparams`` (and so ``load_from_checkpoint``)."""
    return {"class_path": f"{type(net).__module__}.{type(net).__qualname__}", "init_args": dict(getattr(net, "init_args", {}))}


def build_network(net: nn.Module | dict | None) -> nn.Module:
    """The network from an instance, a {"class_path", "init_args"} dict (as checkpoints store it), or None (UNet()),
    checked against the contract."""
    if net is None:
        net = UNet()
    elif isinstance(net, dict):
        from lightning.pytorch.cli import instantiate_class

        net = instantiate_class((), {"class_path": net["class_path"], "init_args": net.get("init_args", {})})
    elif not isinstance(net, nn.Module):
        raise TypeError(f"net must be an nn.Module (or its class_path/init_args config), got {type(net).__name__}")
    for name in ("image_size", "channels"):
        if not isinstance(getattr(net, name, None), int):
            raise ValueError(f"the network {type(net).__name__} must have an int attribute {name!r}")
    if net.channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3 (greyscale or RGB images), got {net.channels}")
    return net


def with_net_defaults(hparams: dict) -> dict:
    """``hparams`` with the network's arguments that its config does not name set to the class's defaults: a
    checkpoint written before an argument existed (``fourier_scale``, say) was built with its default, so the two
    compare equal. The class must be imported already (nothing is imported here); a shallow copy."""
    net = hparams.get("net")
    if not isinstance(net, dict) or not isinstance(net.get("class_path"), str):
        return hparams
    module, _, name = net["class_path"].rpartition(".")
    cls = getattr(sys.modules.get(module), name, None)
    if not isinstance(cls, type):
        return hparams
    defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items() if p.default is not inspect.Parameter.empty}
    init_args = {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()} | net.get("init_args", {})
    return {**hparams, "net": {**net, "init_args": init_args}}

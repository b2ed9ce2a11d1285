"""The ``net`` argument of every method: what a network must be, and how it is kept in a checkpoint.

A network is any ``nn.Module`` F(c_in·x, c_noise) → image-shaped output whose ``__init__`` takes
``image_size`` and ``channels`` (the CLI links them from the data) and keeps them as int attributes.
A class-conditional network also has an int attribute ``num_classes`` = K > 0 and is called
F(c_in·x, c_noise, class_labels) with integer labels (B,) in [0, K) or −1 for "no label" (``core.conditioning``);
a network without the attribute (or with 0) is unconditional and is never given labels.
Checkpoints store it as plain data, {"class_path", "init_args"}, so they load with ``weights_only``.
"""

import inspect

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
    num_classes_of(net)
    return net


def num_classes_of(net: nn.Module) -> int:
    """K, the classes a network is conditioned on: its ``num_classes`` attribute, 0 (unconditional) without one."""
    k = getattr(net, "num_classes", 0)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"the network {type(net).__name__} has num_classes={k!r}: it must be an int >= 0 (0: unconditional)")
    return k


def with_net_defaults(hparams: dict, cls: type) -> dict:
    """``hparams`` with the network's arguments that its config does not name set to the defaults of ``cls``, its
    class: a network is built with those, so a checkpoint written before an argument existed (``fourier_scale``,
    say) compares equal to one that names the default. A shallow copy."""
    defaults = {k: list(p.default) if isinstance(p.default, tuple) else p.default
                for k, p in inspect.signature(cls).parameters.items() if p.default is not inspect.Parameter.empty}
    net = hparams["net"]
    return {**hparams, "net": {**net, "init_args": defaults | net.get("init_args", {})}}

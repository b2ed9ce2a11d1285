"""``compile=True``: every network compiled in place for training and sampling, weights and checkpoints unchanged."""

from collections.abc import Iterable

from torch import nn


def compile_networks(parametrised: Iterable[nn.Module]) -> None:
    """Compile the network F inside each parametrisation (f_θ, D_φ) with ``nn.Module.compile``.

    In place, so the state-dict keys stay those of the eager network (``torch.compile(m)`` would prefix
    them with ``_orig_mod``), and the σ scalings around F stay eager, in float32 under autocast.
    """
    for f in parametrised:
        f.net.compile()

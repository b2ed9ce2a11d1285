"""``compile=True``: every network compiled in place for training and sampling, weights and checkpoints unchanged;
``compile="regional"``: only its repeated blocks, so the first compiled step comes far sooner."""

from collections.abc import Iterable

import torch
from torch import nn

MODES = (False, True, "regional")


def repeated_blocks(net: nn.Module) -> list[nn.Module]:
    """The outermost elements of the network's ``nn.ModuleList``s (the UNet's residual blocks), the regions that
    regional compilation compiles; empty for a network without lists."""
    blocks, inside = [], set()
    for name, module in net.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, nn.ModuleList):
            for i, block in enumerate(module):
                blocks.append(block)
                inside.add(f"{name}.{i}." if name else f"{i}.")
    return blocks


def compile_networks(parametrised: Iterable[nn.Module], mode: bool | str = True) -> None:
    """Compile the network F inside each parametrisation (f_θ, D_φ) with ``nn.Module.compile``: all of F
    (``mode=True``), or each of its repeated blocks (``"regional"``; the whole F for a network without
    ``nn.ModuleList``s). Blocks of one class share compiled code, recompiled only per distinct shape or setting,
    so the recompile limit is raised to the number of blocks.

    In place, so the state-dict keys stay those of the eager network (``torch.compile(m)`` would prefix
    them with ``_orig_mod``), and the σ scalings around F stay eager, in float32 under autocast.
    """
    if mode not in MODES:
        raise ValueError(f"compile must be one of {MODES}, got {mode!r}")
    for f in parametrised:
        blocks = repeated_blocks(f.net) if mode == "regional" else []
        if not blocks:
            f.net.compile()
            continue
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, len(blocks))
        for block in blocks:
            block.compile(dynamic=False)  # a static graph per distinct shape (inductor mishandles dynamic ones here)

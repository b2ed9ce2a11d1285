"""A diffusion checkpoint read as a teacher (CD) or a starting point (ECT): weights only, checked, hashed.

The file is read once, with ``torch.load(weights_only=True)``, so a checkpoint from elsewhere cannot run
code on load; only the network weights F_φ and the few hyper-parameters the student needs are kept. No
class named in the file is imported: the student builds the teacher's network as a copy of its own and
refuses a file whose network settings differ (``core.structure.network_differences``).
"""

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from cm_lightning.core.ema import weights_keys
from cm_lightning.io.module_paths import imported_class

HOW_TO_TRAIN = "train one with `cm-lightning fit --config configs/mnist_edm.yaml` (or cifar10_edm.yaml)"


@dataclass(frozen=True)
class DiffusionWeights:
    """What a student keeps of a DiffusionModule checkpoint."""

    sha256: str
    hparams: dict  # the teacher's network settings, σ_data and label dropout (plain data)
    net_state: dict[str, Tensor]  # F_φ's state dict


def read_diffusion_checkpoint(
    path: str | Path, weights: str | None = None, role: str = "teacher", *, expected: type
) -> DiffusionWeights:
    """The network weights of a checkpoint of the class ``expected`` (the DiffusionModule) or a subclass of it
    (``weights``: None takes its ``eval_weights``).

    Refuses, naming the file, a missing file, a file that is not a checkpoint, and a checkpoint of
    another kind (a consistency model, a 0.1 checkpoint).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"the {role} checkpoint {str(path)!r} does not exist: give the last.ckpt of a "
                                f"DiffusionModule run ({HOW_TO_TRAIN})")
    data = path.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"the {role} file {str(path)!r} is not a checkpoint that loads with weights_only=True: {err}") from err
    del data
    hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
    kind = hparams.get("_class_path")
    if not _is_kind(kind, expected):
        what = f"a {kind.rsplit('.', 1)[-1]} checkpoint" if isinstance(kind, str) else "not a cm-lightning 0.2+ checkpoint"
        raise ValueError(f"the {role} {str(path)!r} is {what}; the {role} must be a {expected.__name__} checkpoint ({HOW_TO_TRAIN})")
    weights = weights or hparams.get("eval_weights", "online")
    prefix = _prefix(weights, hparams.get("ema_decays", []), path, role)
    state = checkpoint.get("state_dict", {})
    net_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not net_state:
        raise ValueError(f"the {role} {str(path)!r} holds no {weights!r} network weights (keys {prefix}*)")
    return DiffusionWeights(sha256, {k: hparams[k] for k in ("net", "sigma_data", "label_dropout") if k in hparams}, net_state)


def _is_kind(kind, expected: type) -> bool:
    """Whether the class named ``kind`` (by today's or an older module path) is ``expected`` or a subclass of it
    already imported by the user's code: nothing named in the file is imported."""
    cls = imported_class(kind) if isinstance(kind, str) else None
    return cls is not None and issubclass(cls, expected)


def _prefix(weights: str, decays: list, path: Path, role: str) -> str:
    names = weights_keys(decays)
    if weights not in names:
        raise ValueError(f"the {role} {str(path)!r} has no weights {weights!r}: choose one of {sorted(names)}")
    return names[weights] + ".net."

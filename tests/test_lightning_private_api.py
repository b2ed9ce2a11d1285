"""Every private Lightning API the project uses, where it uses it, and the shape it relies on.

None has a public replacement (each use says why). If Lightning renames or reshapes one, the test of that
entry fails here by name, before a behaviour test fails somewhere far from the cause.
"""

import inspect
from pathlib import Path

import pytest
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

ROOT = Path(__file__).parents[1]
# (owner, name, parameters it must take, the one file that uses it)
METHODS = [
    (LightningCLI, "_parse_ckpt_path", ["self"], "cli.py"),
    (LightningCLI, "_run_subcommand", ["self", "subcommand"], "cli.py"),
    (ModelCheckpoint, "_should_skip_saving_checkpoint", ["self", "trainer"], "callbacks/checkpoint.py"),
    (ModelCheckpoint, "_save_last_checkpoint", ["self", "trainer", "monitor_candidates"], "callbacks/checkpoint.py"),
    (ModelCheckpoint, "_monitor_candidates", ["self", "trainer"], "callbacks/checkpoint.py"),
]


def users(name: str) -> list[str]:
    """The project's source files that name ``name`` (tests aside)."""
    files = [*ROOT.glob("cm_lightning/**/*.py"), *ROOT.glob("callbacks/*.py"), *ROOT.glob("datamodules/*.py"), ROOT / "cli.py"]
    return sorted(str(p.relative_to(ROOT)) for p in files if f".{name}" in p.read_text() or f"def {name}(" in p.read_text())


@pytest.mark.parametrize("owner, name, parameters, user", METHODS, ids=[m[1] for m in METHODS])
def test_a_private_method_still_has_the_signature_we_override_or_call(owner, name, parameters, user):
    assert callable(getattr(owner, name, None)), f"Lightning no longer has {owner.__name__}.{name} ({user} uses it)"
    assert list(inspect.signature(getattr(owner, name)).parameters) == parameters, f"{owner.__name__}.{name} changed ({user})"
    assert users(name) == [user]


def test_a_trainer_still_holds_its_cluster_environment_privately(tmp_path):
    trainer = Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path)
    assert isinstance(trainer._accelerator_connector.cluster_environment, ClusterEnvironment)
    assert users("_accelerator_connector") == ["callbacks/interrupt.py"]


def test_a_module_still_keeps_its_trainer_or_none_privately(tmp_path):
    module = LightningModule()
    assert module._trainer is None
    trainer = Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path)
    module.trainer = trainer
    assert module._trainer is trainer
    assert users("_trainer") == ["cm_lightning/methods/base.py"]


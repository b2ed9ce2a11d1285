"""Where the modules of cm-lightning 0.2 live now, so that every file naming them keeps working.

0.2 kept all its modules side by side in ``cm_lightning/``; they now live in wings (core, nets, sampling,
io, methods). Checkpoints name classes by module path (``hyper_parameters._class_path``,
``hyper_parameters.net.class_path``), and so do the ``config.yaml`` of every run and users' own configs
(``cm_lightning.unet.UNet``, ``cm_lightning.module.ConsistencyTrainingModule``,
``cm_lightning.lr_schedules.CosineDecay``). ``install()`` lets Python import each 0.2 module name as a
module whose attributes are those of the modules that hold its contents now: the very same objects, so a
class loaded by its old path is the class of today.
"""

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

PACKAGE = "cm_lightning"

# 0.2 module → the modules that hold its names now (the first holds its classes).
MOVED: dict[str, tuple[str, ...]] = {
    "base": ("methods.base", "core.noise"),
    "checkpoint_io": ("io.files",),
    "consistency": ("nets.preconditioning", "core.noise", "sampling.samplers"),
    "diffusion": ("methods.diffusion",),
    "distillation": ("methods.distillation",),
    "editing": ("sampling.editing",),
    "ema": ("core.ema",),
    "family": ("methods.consistency",),
    "karras": ("core.karras",),
    "losses": ("core.losses",),
    "lr_schedules": ("core.lr_schedules",),
    "mnist_classifier": ("nets.mnist_classifier",),
    "module": ("methods.consistency_training",),
    "networks": ("sampling.sampling_module", "nets.contract"),
    "objectives": ("core.objectives",),
    "recipes": ("core.recipes",),
    "step_search": ("sampling.schedule_search",),
    "teacher": ("io.teacher_file", "core.structure"),
    "tuning": ("methods.easy_tuning",),
    "unet": ("nets.unet",),
    "upgrade": ("io.upgrade",),
}  # 0.2's ``cm_lightning.sampling`` is today's package of the same name, which exports the same names
# The modules of the classes a checkpoint names as its LightningModule: imported with the package, because
# Lightning's ``load_from_checkpoint`` accepts such a class only from a module already in ``sys.modules``.
EAGER = ("base", "family", "module", "diffusion", "distillation", "tuning")


def current_class_path(class_path: str) -> str:
    """Today's path of a class named by its 0.2 path (``cm_lightning.unet.UNet`` → ``cm_lightning.nets.unet.UNet``);
    any other path unchanged. Plain string work, for classes (each 0.2 module's first home holds its classes):
    nothing is imported."""
    module, _, name = class_path.rpartition(".")
    old = module.removeprefix(f"{PACKAGE}.")
    if module.startswith(f"{PACKAGE}.") and old in MOVED:
        return f"{PACKAGE}.{MOVED[old][0]}.{name}"
    return class_path


def imported_class(class_path: str) -> type | None:
    """The class named by ``class_path`` (today's path or 0.2's) if its module is imported already, else None.
    Nothing is imported: a name read from a file never runs code."""
    module, _, name = current_class_path(class_path).rpartition(".")
    cls = getattr(sys.modules.get(module), name, None)
    return cls if isinstance(cls, type) else None


def canonical_class_path(class_path: str) -> str:
    """The module path where the class named by ``class_path`` is defined, for comparing two names of one
    class (``cm_lightning.UNet``, ``cm_lightning.unet.UNet`` and ``cm_lightning.nets.unet.UNet`` are one);
    a class not imported yet keeps its (mapped) name."""
    cls = imported_class(class_path)
    return f"{cls.__module__}.{cls.__qualname__}" if cls is not None else current_class_path(class_path)


def with_canonical_net(hparams: dict) -> dict:
    """``hparams`` with ``net.class_path`` in canonical form (a shallow copy; the original is untouched)."""
    net = hparams.get("net")
    if not isinstance(net, dict) or not isinstance(net.get("class_path"), str):
        return hparams
    return {**hparams, "net": {**net, "class_path": canonical_class_path(net["class_path"])}}


class _OldModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``cm_lightning.<0.2 module>`` and loads it as a view of its new homes; asked before Python's own
    finders, so a stale 0.2 file left in an old installation cannot define a second class of the same name."""

    def find_spec(self, fullname, path=None, target=None):
        old = fullname.removeprefix(f"{PACKAGE}.")
        if fullname.startswith(f"{PACKAGE}.") and old in MOVED:
            home = importlib.util.find_spec(f"{PACKAGE}.{MOVED[old][0]}")
            return importlib.util.spec_from_loader(fullname, self, origin=home.origin)  # (runpy's sys.argv[0])
        return None

    def create_module(self, spec):
        return None  # a plain module, filled in by exec_module

    def exec_module(self, module: ModuleType) -> None:
        homes = [importlib.import_module(f"{PACKAGE}.{home}") for home in MOVED[module.__name__.removeprefix(f"{PACKAGE}.")]]
        module.__doc__ = f"cm-lightning 0.2's {module.__name__}, now in " + ", ".join(h.__name__ for h in homes) + "."

        def __getattr__(name: str):
            for home in homes:
                if hasattr(home, name):
                    return getattr(home, name)
            raise AttributeError(f"module {module.__name__!r} (now {', '.join(h.__name__ for h in homes)}) has no attribute {name!r}")

        module.__getattr__ = __getattr__

    def get_code(self, fullname: str):
        """``python -m cm_lightning.upgrade`` runs today's module (``runpy`` asks for the code)."""
        home = f"{PACKAGE}.{MOVED[fullname.removeprefix(f'{PACKAGE}.')][0]}"
        return importlib.util.find_spec(home).loader.get_code(home)


def install() -> None:
    """Put the finder first and import the 0.2 names of the methods' modules (``EAGER``); idempotent. Called by
    ``import cm_lightning`` once the wings are imported; every other 0.2 name is loaded when first asked for."""
    if not any(isinstance(finder, _OldModules) for finder in sys.meta_path):
        sys.meta_path.insert(0, _OldModules())
    for old in EAGER:
        importlib.import_module(f"{PACKAGE}.{old}")

"""The package's house rules, checked on its source: imports run one way between the wings, and files stay short."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "cm_lightning"
# What each wing may import of cm_lightning besides itself (README, Layout): core nothing, the middle wings only core.
ALLOWED = {"core": set(), "nets": {"core"}, "sampling": {"core"}, "io": {"core"}, "methods": {"core", "nets", "sampling", "io"}}
OUTSIDE = ("callbacks", "datamodules", "cli")  # the package never imports the layers built on it
MAX_LINES = 400


def imported(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function, as an absolute dotted name."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):  # a relative import keeps its dots, and is refused below
            module = "." * node.level + (node.module or "")
            names |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return names


def violations(package: Path) -> list[str]:
    """"file: imports X" for each import against the direction of the wings, or out of the package."""
    out = []
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).parts
        if len(parts) < 2 or parts[0] not in ALLOWED:
            continue  # the package's __init__ gathers the public names from every wing
        wing = parts[0]
        for name in sorted(imported(path)):
            top, _, rest = name.partition(".")
            if name.startswith("."):
                out.append(f"{path.relative_to(package)}: imports {name} (the package imports absolutely)")
            elif top in OUTSIDE:
                out.append(f"{path.relative_to(package)}: imports {name} (outside the package)")
            elif top == package.name:
                other = rest.partition(".")[0]
                if other != wing and other not in ALLOWED[wing]:
                    out.append(f"{path.relative_to(package)}: imports {name} ({wing} may import {sorted(ALLOWED[wing]) or 'nothing of ours'})")
    return out


def test_imports_run_one_way_between_the_wings():
    assert violations(PACKAGE) == []


def test_every_file_of_the_package_is_in_a_wing():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert loose == [] and {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(ALLOWED)


@pytest.mark.parametrize("source, wing, complaint", [
    ("from cm_lightning.methods.base import GenerativeModule", "core", "core/bad.py: imports cm_lightning.methods.base"),
    ("import cm_lightning.sampling.samplers", "nets", "nets/bad.py: imports cm_lightning.sampling.samplers"),
    ("def f():\n    from callbacks.nonfinite import NonFiniteGuard\n", "methods", "methods/bad.py: imports callbacks.nonfinite"),
    ("from cm_lightning import UNet", "io", "io/bad.py: imports cm_lightning.UNet"),
    ("from ..methods import base", "sampling", "sampling/bad.py: imports ..methods.base"),
])
def test_the_check_finds_an_import_against_the_direction(tmp_path, source, wing, complaint):
    package = tmp_path / "cm_lightning"
    (package / wing).mkdir(parents=True)
    (package / wing / "bad.py").write_text(source)
    assert any(v.startswith(complaint) for v in violations(package))


def test_files_stay_under_400_lines():
    root = PACKAGE.parent
    files = [*PACKAGE.rglob("*.py"), *root.glob("callbacks/*.py"), *root.glob("datamodules/*.py"), root / "cli.py"]
    long = {str(p.relative_to(root)): n for p in files if (n := len(p.read_text().splitlines())) >= MAX_LINES}
    assert long == {}

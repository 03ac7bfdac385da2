"""Dependencies point down: the error types import nothing of salt, the models no HDF5."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "salt"


def salt_imports(module: str) -> list[str]:
    """The salt modules a file of the package imports."""
    tree = ast.parse((SRC / module).read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    return [m for m in imported if m and m.split(".")[0] == "salt"]


@pytest.mark.parametrize("module", ["errors.py", "signals.py", "utils/names.py"])
def test_bottom_modules_import_nothing_from_salt(module: str) -> None:
    """Every layer may use these: they must not pull the package in."""
    assert salt_imports(module) == []


def test_every_exception_class_lives_in_errors() -> None:
    elsewhere = []
    for path in SRC.rglob("*.py"):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                isinstance(b, ast.Name) and b.id.endswith(("Error", "Exception"))
                for b in node.bases
            ):
                elsewhere.append(f"{path.relative_to(SRC)}:{node.name}")
    assert not elsewhere, elsewhere


def test_the_model_layer_does_not_import_h5py() -> None:
    code = "import sys, salt.models; print('h5py' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_temporary_files_are_named_in_one_place() -> None:
    """Every atomic write goes through salt.utils.atomic (`.<name>.tmp-<pid>-<hex>`), so a
    leftover is recognisable by one rule (`is_temp_name`)."""
    import re

    pattern = re.compile(r"""\.tmp["'}]""")
    offenders = [
        str(path.relative_to(SRC))
        for path in SRC.rglob("*.py")
        if path.name != "atomic.py" and pattern.search(path.read_text())
    ]
    assert not offenders, offenders


def test_signal_handlers_are_installed_in_one_place() -> None:
    """Only salt.signals installs handlers or raises signals; the rest uses its `Catch`."""
    calls = {"signal", "raise_signal", "siginterrupt", "set_wakeup_fd", "pthread_sigmask"}
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "signals.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "signal"
                and node.attr in calls
            ) or (isinstance(node, ast.ImportFrom) and node.module == "signal"):
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not offenders, offenders


def test_configs_are_read_once_into_their_dataclasses() -> None:
    """Below the entry points nothing indexes a config with strings: the commands read it once
    into the schema's dataclasses (salt.schema) and use their attributes. Only the command
    wrappers look at the raw config (the debug flag, a resumed run's overrides, the check of a
    command line before Hydra runs)."""
    import re

    raw = re.compile(r"\b\w*cfg\w*(\.\w+)*(\.get\(|\[\")")
    allowed = {"errors.py", "config_check.py", "train.py"}
    found = [
        f"{path.relative_to(SRC)}:{i}: {line.strip()}"
        for path in sorted(SRC.rglob("*.py"))
        if path.name not in allowed
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if raw.search(line)
    ]
    assert not found, "\n".join(found)

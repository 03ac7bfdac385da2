"""Atomic writes: the final name always holds a complete file, leftovers are recognisable."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from salt.utils.atomic import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    atomic_write_yaml,
    is_temp_name,
    temp_name,
)

SRC = Path(__file__).resolve().parents[1] / "src"


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if is_temp_name(p.name))


def test_write_helpers_round_trip(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "b.txt", "héllo\n")
    atomic_write_yaml(tmp_path / "sub" / "c.yaml", {"b": [1, 2.5, None], "a": {"x": True}})
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo\n"
    text = (tmp_path / "sub" / "c.yaml").read_text()
    assert yaml.safe_load(text) == {"b": [1, 2.5, None], "a": {"x": True}}
    assert text.index("b:") < text.index("a:")  # key order kept
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "sub") == []


def test_overwrite_replaces_content(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_exception_mid_write_keeps_previous_file(tmp_path: Path, error: BaseException) -> None:
    target = tmp_path / "f.txt"
    target.write_text("previous")
    with pytest.raises(type(error)), atomic_path(target) as tmp:
        tmp.write_text("half of the new cont")
        assert tmp.parent == tmp_path and is_temp_name(tmp.name)
        raise error
    assert target.read_text() == "previous"
    assert _leftovers(tmp_path) == []


def test_block_that_writes_nothing_is_an_error(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_text("previous")
    with pytest.raises(FileNotFoundError, match="did not create"), atomic_path(target):
        pass
    assert target.read_text() == "previous"


def test_yaml_refuses_non_plain_types_before_touching_the_file(tmp_path: Path) -> None:
    target = tmp_path / "m.yaml"
    target.write_text("old: 1\n")
    with pytest.raises(TypeError, match=r"m\.yaml"):
        atomic_write_yaml(target, {"path": Path("/x")})
    assert target.read_text() == "old: 1\n"
    assert _leftovers(tmp_path) == []


def test_temp_names() -> None:
    name = temp_name("last.ckpt")
    assert name.startswith(".last.ckpt.tmp-") and is_temp_name(name)
    assert temp_name("last.ckpt") != name  # random part
    for final in ["last.ckpt", "epoch=001-val_loss=0.50000.ckpt", ".hidden", "x.tmp-1-zz"]:
        assert not is_temp_name(final)


def test_process_killed_mid_write_leaves_previous_file(tmp_path: Path) -> None:
    """A real SIGKILL (what Slurm does after the grace time) in the middle of a write."""
    target = tmp_path / "state.bin"
    target.write_bytes(b"complete previous state")
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(SRC)!r})
        from salt.utils.atomic import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"partial")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"complete previous state"
    left = _leftovers(tmp_path)
    assert len(left) == 1 and left[0].startswith(".state.bin.tmp-")  # recognisable by name

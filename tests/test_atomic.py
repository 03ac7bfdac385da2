"""Atomic writes: the final name always holds a complete file, leftovers are recognisable."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from salt.errors import RERUN_ADVICE, RESUME_ADVICE, OutputWriteError, os_errno, run_entry_point
from salt.utils.atomic import (
    OutputSet,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    atomic_write_yaml,
    is_temp_name,
    temp_name,
)
from salt.utils.h5_output import H5Output
from tests.conftest import fill_disk, small_tmpfs

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


# ---- output sets: all files or none, and failed writes named ------------------------------
def test_output_set_puts_every_file_in_place_or_none(tmp_path: Path) -> None:
    a, b = tmp_path / "a.h5", tmp_path / "sub" / "b.png"
    a.write_text("earlier a")
    stale = tmp_path / "c.yaml"
    stale.write_text("earlier c")
    with pytest.raises(RuntimeError, match="plot failed"), OutputSet() as outputs:
        with outputs.file(a) as tmp:
            assert tmp.parent == tmp_path and is_temp_name(tmp.name)
            tmp.write_text("new a")
        with outputs.file(b) as tmp:
            tmp.write_text("half")
            raise RuntimeError("plot failed")
    assert a.read_text() == "earlier a" and not b.exists() and stale.exists()
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "sub") == []
    with OutputSet() as outputs:
        for path in (a, b):
            with outputs.file(path) as tmp:
                tmp.write_text(f"new {path.stem}")
        assert a.read_text() == "earlier a"  # nothing in place before the commit
        outputs.commit(remove=[stale])
    assert (a.read_text(), b.read_text(), stale.exists()) == ("new a", "new b", False)
    assert _leftovers(tmp_path) == []


def test_output_set_reports_a_full_disk_in_one_line(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        out = disk / "model.onnx"
        out.write_bytes(b"earlier")
        fill_disk(disk, leave=16_384)
        with pytest.raises(OutputWriteError) as failed, OutputSet() as outputs:
            with outputs.file(out) as tmp:
                tmp.write_bytes(b"\1" * 100_000)
            outputs.commit()
        message = str(failed.value)
        assert message.startswith(f"could not write {out}: No space left on device; 0.")
        assert message.endswith(
            f" MiB free in {disk}; nothing was written (earlier results unchanged). Free space "
            "(or raise the quota) and run the same command again."
        )
        assert out.read_bytes() == b"earlier" and _leftovers(disk) == []


def test_hdf5_output_on_a_full_disk_closes_cleanly(tmp_path: Path) -> None:
    """In a real process: HDF5's own writer leaves a file it cannot close on a full disk and
    the process crashes at exit (segmentation fault); `H5Output` keeps the error for Python."""
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        fill_disk(disk, leave=64 * 1024)
        script = textwrap.dedent(
            f"""
            import sys
            import numpy as np
            sys.path.insert(0, {str(SRC)!r})
            from salt.utils.h5_output import H5Output
            try:
                with H5Output({str(disk / "p.h5")!r}) as out:
                    ds = out.file.create_dataset("x", shape=(100_000,), dtype="f8", chunks=(1000,))
                    for i in range(0, 100_000, 1000):
                        ds[i : i + 1000] = np.random.default_rng(i).normal(size=1000)
                        out.check()
            except OSError as err:
                print("kept:", err.errno, err.strerror, err.filename)
            """
        )
        proc = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
        )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"kept: 28 No space left on device {disk / 'p.h5'}"
    assert proc.stderr == ""  # no "Exception ignored ... Can't close file"


def test_hdf5_output_round_trips(tmp_path: Path) -> None:
    import h5py
    import numpy as np

    data = np.random.default_rng(0).normal(size=(5000, 7)).astype("f4")
    with H5Output(tmp_path / "p.h5") as out:
        out.file.attrs["tagger"] = "GN2"
        ds = out.file.create_dataset("x", shape=data.shape, dtype="f4", chunks=(100, 7))
        for i in range(0, 5000, 300):
            ds[i : i + 300] = data[i : i + 300]
    with h5py.File(tmp_path / "p.h5") as f:
        np.testing.assert_array_equal(f["x"][:], data)
        assert f.attrs["tagger"] == "GN2"


def test_disk_full_fallback_gives_the_commands_advice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A full disk a command did not report itself: training says resume, evaluation and
    export say run again; HDF5's errno only in the message text counts as well."""
    hdf5_text = RuntimeError("Can't close file (file write failed: errno = 28, error message)")
    assert os_errno(hdf5_text) == errno.ENOSPC
    with small_tmpfs(tmp_path / "disk", "64k") as disk:
        fill_disk(disk, leave=0)

        def write(_: object) -> None:
            (disk / "log.txt").write_bytes(b"x" * 100_000)

        for advice in (RESUME_ADVICE, RERUN_ADVICE):
            with pytest.raises(SystemExit):
                run_entry_point(write, {}, disk_full_advice=advice)
            err = capsys.readouterr().err.strip()  # (a failed write() names no file)
            expected = "No space left on device; free space (or raise the quota) and "
            assert err == f"salt: error: {expected}{advice}"

"""Checkpoints: atomic save, safe load, RNG round trip, names, and which file to resume from."""

from __future__ import annotations

import os
import pickle
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from salt.training.checkpoint import (
    FORMAT_VERSION,
    LAST,
    MARKER,
    CheckpointError,
    CheckpointWriteError,
    best_checkpoint,
    checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    parse_checkpoint_name,
    remove_temp_files,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from salt.utils.atomic import is_temp_name
from tests.conftest import small_tmpfs


def _state(scale: float = 1.0, size: int = 8) -> dict:
    model = torch.nn.Linear(size, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(2, size)).sum().backward()
    optimizer.step()
    with torch.no_grad():
        model.weight.fill_(scale)  # a value the tests recognise
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": {"last_epoch": 3, "_last_lr": [1e-3]},
        "scaler": {"scale": 65536.0, "_growth_tracker": 0},
        "data": {"epoch": 1, "batches_done": 7, "order": (3, 1, 2)},
        "rng": rng_state(),
        "counters": {"epoch": 1, "step": 42},
        "config": {"name": "GN2", "layers": [128, 64], "dropout": 0.1, "norm": None},
        "logger": {"experiment_key": None},
    }


def _temp_files(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if is_temp_name(p.name)]


# --------------------------------------------------------------------------- save / load


def test_round_trip_adds_marker_and_keeps_values(tmp_path: Path) -> None:
    state = _state()
    path = tmp_path / "ckpts" / LAST
    save_checkpoint(state, path)
    assert MARKER not in state  # the caller's dict is not changed
    loaded = load_checkpoint(path)
    assert loaded[MARKER] == FORMAT_VERSION
    assert loaded["counters"] == {"epoch": 1, "step": 42}
    assert loaded["config"] == state["config"]
    assert loaded["data"]["order"] == (3, 1, 2)
    for key, value in state["model"].items():
        assert torch.equal(loaded["model"][key], value)
    model = torch.nn.Linear(8, 3)
    model.load_state_dict(loaded["model"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.load_state_dict(loaded["optimizer"])  # a real optimizer accepts it back
    assert _temp_files(path.parent) == []


def test_save_refuses_values_that_could_not_be_loaded_back(tmp_path: Path) -> None:
    path = tmp_path / LAST
    state = _state()
    state["counters"]["best"] = np.float32(0.5)  # a numpy scalar sneaks in
    with pytest.raises(TypeError, match=r"counters\.best.*numpy"):
        save_checkpoint(state, path)
    assert not path.exists()


def test_save_refuses_a_foreign_format_marker(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="format"):
        save_checkpoint({MARKER: 99, "model": {}}, tmp_path / LAST)


class _Boom(torch.Tensor):
    """A tensor whose serialisation fails, to interrupt torch.save half-way."""

    def __reduce_ex__(self, protocol: int):  # type: ignore[override]
        raise KeyboardInterrupt


def test_interrupt_during_save_keeps_previous_checkpoint(tmp_path: Path) -> None:
    """Ctrl-C while torch.save runs (the temp file is open). A failure after bytes reached the
    disk is covered for real by the full-disk test, and a SIGKILL by test_atomic."""
    path = tmp_path / LAST
    save_checkpoint(_state(scale=1.0), path)
    before = path.read_bytes()
    broken = _state(scale=2.0)
    broken["zzz"] = torch.ones(3).as_subclass(_Boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(broken, path)
    assert path.read_bytes() == before
    assert torch.all(load_checkpoint(path)["model"]["weight"] == 1.0)
    assert _temp_files(tmp_path) == []


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.ckpt")


@pytest.mark.parametrize("cut", [0, 10, 0.5, -1])
def test_truncated_file_is_a_clear_error(tmp_path: Path, cut: float) -> None:
    good = tmp_path / "good.ckpt"
    save_checkpoint(_state(), good)
    data = good.read_bytes()
    end = int(len(data) * cut) if isinstance(cut, float) else (cut % len(data))
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(data[:end])
    with pytest.raises(CheckpointError, match="not a salt checkpoint or truncated") as info:
        load_checkpoint(bad)
    assert str(bad) in str(info.value)


def test_a_text_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("model:\n  name: GN2\n")
    with pytest.raises(CheckpointError, match="not a salt checkpoint or truncated"):
        load_checkpoint(path)


class _Evil:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.mkdir, (str(self.sentinel),))


@pytest.mark.parametrize(
    ("writer", "message"),
    [
        ("torch", r"refusing to load .*could run code"),
        ("pickle", r"not a salt checkpoint or truncated: not a torch file"),
    ],
)
def test_malicious_pickle_is_refused_and_does_not_run(
    tmp_path: Path, writer: str, message: str
) -> None:
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    payload = {MARKER: FORMAT_VERSION, "model": {}, "x": _Evil(sentinel)}
    if writer == "torch":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)
    assert not sentinel.exists()


def test_torch_file_without_marker(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"model": {"w": torch.ones(2)}}, path)
    with pytest.raises(CheckpointError, match="not a salt checkpoint: no 'salt_checkpoint'"):
        load_checkpoint(path)
    torch.save([1, 2], path)
    with pytest.raises(CheckpointError, match="not a salt checkpoint"):
        load_checkpoint(path)


def test_newer_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / LAST
    torch.save({MARKER: FORMAT_VERSION + 1}, path)
    with pytest.raises(CheckpointError, match="newer salt"):
        load_checkpoint(path)


# --------------------------------------------------------------------------- full disk


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "tiny", "256k") as mount_point:
        yield mount_point


def test_full_disk_keeps_previous_checkpoint(tiny_fs: Path) -> None:
    path = tiny_fs / LAST
    save_checkpoint(_state(scale=1.0), path)  # small: fits
    before = path.read_bytes()
    big = _state(scale=2.0, size=40_000)  # ~1 MB of weights: does not fit
    with pytest.raises(CheckpointWriteError) as info:
        save_checkpoint(big, path)
    message = str(info.value)
    assert str(path) in message and "No space left on device" in message
    assert "MiB free" in message and "unchanged" in message
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == 28
    assert path.read_bytes() == before
    assert torch.all(load_checkpoint(path)["model"]["weight"] == 1.0)
    assert _temp_files(tiny_fs) == []
    # the space of the failed attempt was given back: a small save works again
    save_checkpoint(_state(scale=3.0), path)
    assert torch.all(load_checkpoint(path)["model"]["weight"] == 3.0)


# --------------------------------------------------------------------------- RNG


def _draws() -> tuple:
    return (
        [random.random() for _ in range(3)],
        random.gauss(0, 1),
        np.random.rand(3).tolist(),
        float(np.random.standard_normal()),
        torch.rand(3).tolist(),
        torch.randn(2).tolist(),
    )


def test_rng_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leave a cached gaussian in both generators
    np.random.standard_normal()
    save_checkpoint({"rng": rng_state()}, tmp_path / LAST)
    expected = _draws()
    _draws()  # move on
    set_rng_state(load_checkpoint(tmp_path / LAST)["rng"])
    assert _draws() == expected


def test_set_rng_state_rejects_other_dicts() -> None:
    with pytest.raises(ValueError, match="rng_state"):
        set_rng_state({"python": 1})


# --------------------------------------------------------------------------- names


def test_checkpoint_names() -> None:
    assert checkpoint_name(3, 0.612341) == "epoch=003-val_loss=0.61234.ckpt"
    assert checkpoint_name(1234, 12) == "epoch=1234-val_loss=12.00000.ckpt"
    assert checkpoint_name(0, torch.tensor(0.5)) == "epoch=000-val_loss=0.50000.ckpt"
    for epoch, loss in [(3, 0.61234), (0, -1.5), (12, float("nan")), (7, float("inf"))]:
        parsed = parse_checkpoint_name(checkpoint_name(epoch, loss))
        assert parsed is not None and parsed[0] == epoch
        assert parsed[1] == loss or (np.isnan(parsed[1]) and np.isnan(loss))
    for other in [LAST, "epoch=3.ckpt", ".epoch=003-val_loss=0.10000.ckpt.tmp-1-ab", "x.ckpt"]:
        assert parse_checkpoint_name(other) is None
    for bad in [-1, 1.5, True]:
        with pytest.raises(ValueError, match="epoch"):
            checkpoint_name(bad, 0.1)  # type: ignore[arg-type]


def _touch(directory: Path, name: str, content: bytes = b"x") -> Path:
    path = directory / name
    path.write_bytes(content)
    return path


def test_latest_checkpoint(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    _touch(tmp_path, checkpoint_name(999, 0.3))
    newest = _touch(tmp_path, checkpoint_name(1000, 0.4))  # numeric, not string, order
    _touch(tmp_path, "notes.txt")
    assert latest_checkpoint(tmp_path) == newest
    last = _touch(tmp_path, LAST)
    assert latest_checkpoint(tmp_path) == last


def test_truncated_temp_file_next_to_last_is_ignored(tmp_path: Path) -> None:
    save_checkpoint(_state(scale=1.0), tmp_path / LAST)
    data = (tmp_path / LAST).read_bytes()
    # what a write killed half-way leaves behind
    leftover = _touch(tmp_path, f".{LAST}.tmp-4242-deadbeef", data[: len(data) // 3])
    _touch(tmp_path, f".{checkpoint_name(9, 0.1)}.tmp-4242-cafe0123", data[:100])
    found = latest_checkpoint(tmp_path)
    assert found == tmp_path / LAST
    assert torch.all(load_checkpoint(found)["model"]["weight"] == 1.0)
    assert best_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError):
        load_checkpoint(leftover)
    # a requeued job clears them (they hold disk space), and nothing else
    removed = remove_temp_files(tmp_path)
    assert sorted(p.name for p in removed) == sorted(
        [leftover.name, f".{checkpoint_name(9, 0.1)}.tmp-4242-cafe0123"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST]
    assert remove_temp_files(tmp_path / "missing") == []


def test_best_checkpoint(tmp_path: Path) -> None:
    assert best_checkpoint(tmp_path) is None
    _touch(tmp_path, checkpoint_name(1, 0.5))
    best = _touch(tmp_path, checkpoint_name(2, 0.25))
    _touch(tmp_path, checkpoint_name(3, 0.25))  # a tie: the earlier epoch wins
    _touch(tmp_path, checkpoint_name(4, float("nan")))
    _touch(tmp_path, LAST)
    assert best_checkpoint(tmp_path) == best
    negative = _touch(tmp_path, checkpoint_name(5, -0.1))
    assert best_checkpoint(tmp_path) == negative

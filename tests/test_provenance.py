"""Provenance: real git repositories with a bare remote; seeds; metadata."""

from __future__ import annotations

import logging
import os
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import salt
from salt.provenance import (
    DirtyCheckoutError,
    GitState,
    TagError,
    check_clean,
    collect_metadata,
    git_state,
    push_tag,
    seed_everything,
)
from salt.utils.atomic import atomic_write_yaml


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture(autouse=True)
def _isolated_git_config(tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> None:
    """Keep the user's and the system's git config (signing, hooks paths...) out of the tests."""
    config = tmp_path_factory.mktemp("gitconfig") / "config"
    config.write_text("[init]\n\tdefaultBranch = main\n")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(config))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, Path]:
    """A checkout with one commit and an ``origin`` remote that is a bare repository."""
    remote = tmp_path / "remote.git"
    _git(tmp_path, "init", "-q", "--bare", str(remote))
    work = tmp_path / "work"
    _git(tmp_path, "init", "-q", str(work))
    _git(work, "config", "user.name", "Test User")
    _git(work, "config", "user.email", "test@example.org")
    (work / "train.py").write_text("print('train')\n")
    (work / ".gitignore").write_text("logs/\n.venv/\n")
    (work / "pkg").mkdir()
    (work / "pkg" / "model.py").write_text("x = 1\n")
    _git(work, "add", ".")
    _git(work, "commit", "-q", "-m", "initial")
    _git(work, "remote", "add", "origin", str(remote))
    return work, remote


def _remote_tags(remote: Path) -> str:
    return _git(remote.parent, "ls-remote", "--tags", str(remote))


# --------------------------------------------------------------------------- git_state


def test_clean_checkout(repo: tuple[Path, Path]) -> None:
    work, _ = repo
    state = git_state(work / "pkg" / "model.py")  # a file deep inside works too
    assert state.repo_root == work
    assert state.commit == _git(work, "rev-parse", "HEAD")
    assert state.branch == "main"
    assert not state.dirty and state.dirty_files == []
    check_clean(state, force=False)  # does not raise


def test_ignored_files_do_not_make_it_dirty(repo: tuple[Path, Path]) -> None:
    work, _ = repo
    (work / "logs").mkdir()
    (work / "logs" / "metrics.csv").write_text("1\n")
    assert not git_state(work).dirty


@pytest.mark.parametrize(
    ("change", "line"),
    [
        (lambda w: (w / "pkg" / "model.py").write_text("x = 2\n"), " M pkg/model.py"),
        (lambda w: (w / "notes.py").write_text("new\n"), "?? notes.py"),
        (
            lambda w: ((w / "staged.py").write_text("s\n"), _git(w, "add", "staged.py")),
            "A  staged.py",
        ),
    ],
    ids=["modified", "untracked", "staged"],
)
def test_dirty_checkout_is_refused(repo: tuple[Path, Path], change, line: str) -> None:
    work, _ = repo
    change(work)
    state = git_state(work)
    assert state.dirty and line in state.dirty_files
    with pytest.raises(DirtyCheckoutError) as info:
        check_clean(state, force=False)
    message = str(info.value)
    assert line.split()[-1] in message and "force=true" in message and str(work) in message


def test_long_dirty_listings_are_cut(repo: tuple[Path, Path]) -> None:
    work, _ = repo
    for i in range(25):
        (work / f"new_{i:02d}.py").write_text("x\n")
    state = git_state(work)
    assert len(state.dirty_files) == 25
    with pytest.raises(DirtyCheckoutError, match="and 5 more") as info:
        check_clean(state, force=False)
    assert "new_19.py" in str(info.value) and "new_20.py" not in str(info.value)


def test_force_passes_with_a_warning(repo: tuple[Path, Path], caplog) -> None:
    work, _ = repo
    (work / "train.py").write_text("print('changed')\n")
    with caplog.at_level(logging.WARNING, logger="salt.provenance"):
        check_clean(git_state(work), force=True)
    assert "force=true" in caplog.text and "train.py" in caplog.text


def test_detached_head_and_repo_without_commit(tmp_path: Path, repo: tuple[Path, Path]) -> None:
    work, _ = repo
    _git(work, "checkout", "-q", "--detach")
    state = git_state(work)
    assert state.branch is None and state.commit == _git(work, "rev-parse", "HEAD")
    empty = tmp_path / "empty"
    _git(tmp_path, "init", "-q", str(empty))
    state = git_state(empty)
    assert state.repo_root == empty and state.commit is None
    with pytest.raises(DirtyCheckoutError, match="no commit"):
        check_clean(state, force=False)


def test_not_a_checkout_is_recorded_not_an_error(tmp_path: Path) -> None:
    plain = tmp_path / "site-packages" / "salt"
    plain.mkdir(parents=True)
    state = git_state(plain)
    assert state == GitState(repo_root=None, commit=None, dirty=False, dirty_files=[])
    check_clean(state, force=False)  # nothing to check
    meta = collect_metadata(state=state, seed=1, num_params=3, data_files={})
    assert meta["git"]["commit"] is None and meta["git"]["dirty"] is False


def test_package_in_an_ignored_virtualenv_is_not_the_checkout(repo: tuple[Path, Path]) -> None:
    work, _ = repo
    installed = work / ".venv" / "lib" / "site-packages" / "salt"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("")
    assert git_state(installed).repo_root is None


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        git_state(tmp_path / "nope")


def test_default_path_is_the_salt_sources() -> None:
    state = git_state()
    source = Path(salt.__file__).resolve()
    if state.repo_root is not None:  # running from a checkout (not an installed wheel)
        assert source.is_relative_to(state.repo_root.resolve())
        assert state.commit is not None and len(state.commit) == 40


# --------------------------------------------------------------------------- push_tag


def test_push_tag_reaches_the_remote(repo: tuple[Path, Path]) -> None:
    work, remote = repo
    state = git_state(work)
    push_tag(state, "GN2_20260101-120000")
    tags = _remote_tags(remote)
    assert f"{state.commit}\trefs/tags/GN2_20260101-120000^{{}}" in tags  # annotated, peeled
    assert _git(work, "cat-file", "-t", "GN2_20260101-120000") == "tag"


def test_tag_points_at_the_recorded_commit_even_if_head_moved(repo: tuple[Path, Path]) -> None:
    work, remote = repo
    state = git_state(work)
    (work / "later.py").write_text("x\n")
    _git(work, "add", "later.py")
    _git(work, "commit", "-q", "-m", "later")
    push_tag(state, "run1")
    assert f"{state.commit}\trefs/tags/run1^{{}}" in _remote_tags(remote)


def test_force_prevents_tagging(repo: tuple[Path, Path], caplog) -> None:
    work, remote = repo
    (work / "train.py").write_text("dirty\n")
    with caplog.at_level(logging.WARNING, logger="salt.provenance"):
        push_tag(git_state(work), "run1", force=True)
    assert "not creating" in caplog.text
    assert _remote_tags(remote) == "" and _git(work, "tag") == ""


def test_missing_remote_names_the_available_ones(repo: tuple[Path, Path]) -> None:
    work, _ = repo
    state = git_state(work)
    with pytest.raises(TagError, match=r"no remote named 'upstream' \(remotes: origin\)"):
        push_tag(state, "run1", remote="upstream")
    _git(work, "remote", "remove", "origin")
    with pytest.raises(TagError, match="none configured"):
        push_tag(state, "run1")
    assert _git(work, "tag") == ""


def test_existing_local_tag(repo: tuple[Path, Path]) -> None:
    work, _ = repo
    _git(work, "tag", "run1")
    with pytest.raises(TagError, match="already exists"):
        push_tag(git_state(work), "run1")


def test_rejected_push_reports_git_and_removes_the_local_tag(repo: tuple[Path, Path]) -> None:
    work, remote = repo
    _git(work, "push", "-q", "origin", "HEAD:refs/tags/run1")  # someone else's tag
    with pytest.raises(TagError, match=r"rejected|already exists") as info:
        push_tag(git_state(work), "run1")
    assert "'origin'" in str(info.value) and "local tag was removed" in str(info.value)
    assert _git(work, "tag") == ""  # a retry under another name is not blocked
    push_tag(git_state(work), "run2")
    assert "refs/tags/run2" in _remote_tags(remote)


def test_unreachable_remote_fails_fast(repo: tuple[Path, Path], tmp_path: Path) -> None:
    work, _ = repo
    _git(work, "remote", "add", "gone", str(tmp_path / "deleted.git"))
    with pytest.raises(TagError, match="pushing tag 'run1' to 'gone' failed"):
        push_tag(git_state(work), "run1", remote="gone")


def test_invalid_names_dirty_state_and_no_checkout(repo: tuple[Path, Path]) -> None:
    work, _ = repo
    with pytest.raises(TagError, match="not a valid git tag name"):
        push_tag(git_state(work), "bad:name..")
    (work / "train.py").write_text("dirty\n")
    with pytest.raises(TagError, match="uncommitted changes"):
        push_tag(git_state(work), "run1")
    with pytest.raises(TagError, match="not running from a git checkout"):
        push_tag(GitState(), "run1")


# --------------------------------------------------------------------------- seeds, metadata


def _draws() -> tuple:
    return (random.random(), np.random.rand(2).tolist(), torch.rand(2).tolist())


def test_seed_everything(monkeypatch) -> None:
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)  # restored after the test
    seed_everything(123)
    first = _draws()
    assert os.environ["PYTHONHASHSEED"] == "123"
    seed_everything(123)
    assert _draws() == first
    seed_everything(124)
    assert _draws() != first
    for bad in [-1, 2**32, 1.5, True, "1"]:
        with pytest.raises(ValueError, match="seed"):
            seed_everything(bad)  # type: ignore[arg-type]


def test_metadata_is_complete_and_plain_yaml(repo: tuple[Path, Path], tmp_path: Path) -> None:
    work, _ = repo
    (work / "train.py").write_text("dirty\n")
    state = git_state(work)
    meta = collect_metadata(
        state=state,
        seed=42,
        num_params=1234,
        data_files={
            "train": {"path": tmp_path / "train.h5", "num_jets": np.int64(1000)},
            "val": {"path": str(tmp_path / "val.h5"), "num_jets": 100},
        },
        extra={"world_size": 2, "run_dir": tmp_path / "logs" / "run"},
    )
    assert meta["git"]["commit"] == state.commit and meta["git"]["dirty"] is True
    assert meta["git"]["dirty_files"] == [" M train.py"]
    assert meta["git"]["branch"] == "main"
    assert meta["seed"] == 42 and meta["num_params"] == 1234
    assert meta["data"]["train"] == {"path": str(tmp_path / "train.h5"), "num_jets": 1000}
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["versions"]["salt"] == salt.__version__
    assert set(meta["versions"]) == {"python", "salt", "torch", "numpy", "h5py"}
    assert meta["host"]["hostname"] and meta["time"]
    assert isinstance(meta["argv"], list) and meta["command"]
    assert meta["world_size"] == 2 and meta["run_dir"] == str(tmp_path / "logs" / "run")
    path = tmp_path / "metadata.yaml"
    atomic_write_yaml(path, meta)
    assert yaml.safe_load(path.read_text()) == meta


def test_metadata_slurm_and_bad_extra(monkeypatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "987654")
    meta = collect_metadata(state=GitState(), seed=1, num_params=1, data_files={})
    assert meta["slurm"]["job_id"] == "987654"
    monkeypatch.delenv("SLURM_JOB_ID")
    assert collect_metadata(state=GitState(), seed=1, num_params=1, data_files={})["slurm"] is None
    with pytest.raises(ValueError, match="'seed' clashes"):
        collect_metadata(state=GitState(), seed=1, num_params=1, data_files={}, extra={"seed": 2})
    with pytest.raises(TypeError, match=r"'model\.layer'.*Linear"):
        collect_metadata(
            state=GitState(),
            seed=1,
            num_params=1,
            data_files={},
            extra={"model": {"layer": torch.nn.Linear(1, 1)}},
        )

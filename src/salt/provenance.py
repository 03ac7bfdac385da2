"""Provenance of a training run: git state, the clean-checkout rule, tags, seeds, metadata.

A run must be reproducible from what it records. So training refuses to start from a salt
checkout with uncommitted changes unless ``force=true`` (`check_clean`), the commit hash and
the environment go into ``metadata.yaml`` (`collect_metadata`), ``tag=true`` pushes a tag
named after the run directory (`push_tag`), and every random generator is seeded
(`seed_everything`). When salt is installed as a wheel there is no checkout: that is recorded
(``commit: null``) rather than treated as an error.
"""

from __future__ import annotations

import datetime
import getpass
import logging
import os
import random
import shlex
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import salt
from salt.errors import DirtyCheckoutError, ProvenanceError, TagError

__all__ = [
    "DirtyCheckoutError",
    "GitState",
    "ProvenanceError",
    "TagError",
    "check_clean",
    "collect_metadata",
    "git_state",
    "push_tag",
    "seed_everything",
]

logger = logging.getLogger(__name__)

# How many dirty files an error message lists before summarising the rest.
_MAX_LISTED = 20
# Seconds a `git push` may take before it is killed (it must never hang a training job).
_PUSH_TIMEOUT_S = 120


@dataclass
class GitState:
    """The git checkout salt runs from, as captured at the start of a run.

    ``repo_root`` is None when salt does not run from a checkout (e.g. installed as a wheel);
    then ``commit`` is None and ``dirty`` is False. ``dirty_files`` holds ``git status
    --porcelain`` lines (modified, staged, and untracked files that are not ignored).
    ``branch`` is None on a detached HEAD.
    """

    repo_root: Path | None = None
    commit: str | None = None
    dirty: bool = False
    dirty_files: list[str] = field(default_factory=list)
    branch: str | None = None


def _import_git(start: Path) -> Any | None:
    """Import gitpython; None when the git executable is missing and no checkout is in sight.

    gitpython raises ImportError at import time when it cannot run ``git``. Outside a checkout
    (a wheel install on a bare node) that is fine; inside one we cannot check for uncommitted
    changes, and silently skipping the check would defeat it, so that is an error.
    """
    try:
        import git  # lazy: importing it fails without a git executable
    except ImportError as err:
        if any((p / ".git").exists() for p in (start, *start.parents)):
            raise ProvenanceError(
                f"{start} is inside a git checkout but gitpython cannot run git ({err}); "
                "install git or point GIT_PYTHON_GIT_EXECUTABLE at it"
            ) from err
        return None
    return git


def _git_stderr(err: Exception) -> str:
    """git's own message from a GitCommandError, without gitpython's decoration."""
    text = str(getattr(err, "stderr", "") or "").strip()
    if text.startswith("stderr:"):
        text = text.removeprefix("stderr:").strip().strip("'").strip()
    return text or str(err)


def git_state(path: str | os.PathLike[str] | None = None) -> GitState:
    """Read the git state of the checkout containing ``path`` (default: the salt sources).

    Returns a state with ``repo_root=None`` when ``path`` is not in a checkout, or is ignored
    by the checkout around it (a wheel installed in a virtualenv inside some other repo).
    """
    start = Path(path) if path is not None else Path(salt.__file__).resolve().parent
    if not start.exists():
        raise FileNotFoundError(f"git_state: path does not exist: {start}")
    if not start.is_dir():
        start = start.parent
    git = _import_git(start)
    if git is None:
        return GitState()
    try:
        repo = git.Repo(start, search_parent_directories=True)
    except git.InvalidGitRepositoryError:
        return GitState()
    with repo:
        if repo.bare or repo.working_tree_dir is None:
            return GitState()
        root = Path(repo.working_tree_dir)
        try:
            # An ignored location (site-packages of a .venv inside a repo) is not "the salt
            # checkout": its commit says nothing about the salt code that runs.
            if start.resolve() != root.resolve() and repo.ignored(str(start)):
                return GitState()
            status = repo.git.status("--porcelain", "--untracked-files=normal")
        except git.GitCommandError as err:
            raise ProvenanceError(f"git failed in {root}: {_git_stderr(err)}") from err
        try:
            commit: str | None = repo.head.commit.hexsha
        except ValueError:  # a repository without any commit yet
            commit = None
        try:
            branch: str | None = repo.active_branch.name
        except TypeError:  # detached HEAD
            branch = None
    dirty_files = [line for line in status.splitlines() if line.strip()]
    return GitState(
        repo_root=root,
        commit=commit,
        dirty=bool(dirty_files),
        dirty_files=dirty_files,
        branch=branch,
    )


def _listing(lines: list[str]) -> str:
    shown = [f"  {line}" for line in lines[:_MAX_LISTED]]
    if len(lines) > _MAX_LISTED:
        shown.append(f"  ... and {len(lines) - _MAX_LISTED} more")
    return "\n".join(shown)


def check_clean(state: GitState, force: bool) -> None:
    """Refuse to train from a checkout with uncommitted changes unless ``force``.

    Raises `DirtyCheckoutError` listing what is dirty. With ``force`` it logs a warning
    instead. Outside a checkout there is nothing to check.
    """
    if state.repo_root is None:
        logger.info("salt is not running from a git checkout; no commit will be recorded")
        return
    if state.commit is None:
        problem = f"the salt checkout {state.repo_root} has no commit yet"
    elif state.dirty:
        problem = (
            f"the salt checkout {state.repo_root} has uncommitted changes:\n"
            f"{_listing(state.dirty_files)}"
        )
    else:
        return
    if force:
        logger.warning(
            "force=true: training anyway, but this run cannot be reproduced from its recorded "
            "commit: %s",
            problem,
        )
        return
    raise DirtyCheckoutError(
        f"{problem}\nCommit (or stash) them so the run can be reproduced from the commit "
        "recorded in metadata.yaml, or set force=true to train anyway (force=true also "
        "disables tag=true)."
    )


def push_tag(state: GitState, tag_name: str, remote: str = "origin", force: bool = False) -> None:
    """Create an annotated tag ``tag_name`` at the run's commit and push it to ``remote``.

    Annotated (not lightweight) so the tag itself records who made it and when, and ``git
    describe`` sees it. The tag points at ``state.commit``, the commit captured at the start
    of the run, even if HEAD moved since. ``force=True`` skips tagging with a warning: a forced
    run is not reproducible from a commit, so it gets no tag. If the push fails the local tag
    is deleted again, so a retry is not blocked by it.
    """
    if force:
        logger.warning("force=true: not creating or pushing the run tag %r", tag_name)
        return
    if state.repo_root is None or state.commit is None:
        raise TagError(
            f"cannot create tag {tag_name!r}: salt is not running from a git checkout with a "
            "commit (installed as a package?)"
        )
    if state.dirty:
        raise TagError(
            f"cannot create tag {tag_name!r}: the checkout {state.repo_root} has uncommitted "
            "changes, so the tag would not describe the code that ran:\n"
            f"{_listing(state.dirty_files)}"
        )
    git = _import_git(state.repo_root)
    if git is None:
        raise TagError(f"cannot create tag {tag_name!r}: git is not available")
    with git.Repo(state.repo_root) as repo:
        remotes = [r.name for r in repo.remotes]
        if remote not in remotes:
            available = ", ".join(remotes) if remotes else "none configured"
            raise TagError(
                f"cannot push tag {tag_name!r}: the checkout {state.repo_root} has no remote "
                f"named {remote!r} (remotes: {available})"
            )
        try:
            repo.git.check_ref_format(f"refs/tags/{tag_name}")
        except git.GitCommandError as err:
            raise TagError(f"{tag_name!r} is not a valid git tag name") from err
        if tag_name in [t.name for t in repo.tags]:
            raise TagError(
                f"cannot create tag {tag_name!r}: it already exists in {state.repo_root} "
                f"(at {repo.tags[tag_name].commit.hexsha[:12]})"
            )
        try:
            repo.git.tag("-a", tag_name, "-m", f"salt training run {tag_name}", state.commit)
        except git.GitCommandError as err:
            raise TagError(f"cannot create tag {tag_name!r}: {_git_stderr(err)}") from err
        # Never wait for a password or a host-key prompt: a batch job would hang forever.
        env = {"GIT_TERMINAL_PROMPT": "0"}
        if "GIT_SSH_COMMAND" not in os.environ:
            env["GIT_SSH_COMMAND"] = "ssh -o BatchMode=yes"
        try:
            repo.git.push(
                remote,
                f"refs/tags/{tag_name}:refs/tags/{tag_name}",
                env=env,
                kill_after_timeout=_PUSH_TIMEOUT_S,
            )
        except git.GitCommandError as err:
            repo.git.tag("-d", tag_name)
            raise TagError(
                f"pushing tag {tag_name!r} to {remote!r} failed (the local tag was removed "
                f"again): {_git_stderr(err)}"
            ) from err
    logger.info("pushed tag %s (commit %s) to %s", tag_name, state.commit[:12], remote)


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global generator and torch (CPU and all CUDA devices).

    Also sets ``PYTHONHASHSEED`` so that child processes (data workers started with spawn,
    DDP ranks) hash strings reproducibly; it cannot change hashing in this process.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too
    os.environ["PYTHONHASHSEED"] = str(seed)


def _plain(value: Any, where: str) -> Any:
    """Convert ``value`` to YAML-safe plain types, or raise naming where it sits."""
    # Exact built-in types: yaml.safe_dump refuses subclasses (e.g. torch's TorchVersion).
    if value is None or isinstance(value, bool):
        return value
    for kind in (str, int, float):
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(
        f"metadata entry {where!r} has type {type(value).__name__}; expected str, int, float, "
        "bool, None, a path, or a list/dict of those"
    )


def _version(module_name: str) -> str | None:
    try:
        module = __import__(module_name)
    except ImportError:
        return None
    return str(getattr(module, "__version__", None))


def _user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # containers without a passwd entry for the uid
        return None


def _cuda() -> dict[str, Any] | None:
    if not torch.cuda.is_available():
        return None
    return {
        "version": torch.version.cuda,
        "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }


def _slurm() -> dict[str, str] | None:
    keys = {
        "job_id": "SLURM_JOB_ID",
        "array_job_id": "SLURM_ARRAY_JOB_ID",
        "array_task_id": "SLURM_ARRAY_TASK_ID",
        "nodelist": "SLURM_JOB_NODELIST",
    }
    if "SLURM_JOB_ID" not in os.environ:
        return None
    return {k: os.environ[v] for k, v in keys.items() if v in os.environ}


def collect_metadata(
    *,
    state: GitState,
    seed: int,
    num_params: int,
    data_files: dict[str, dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything needed to tell later how a run was made, as plain YAML-safe types.

    ``data_files`` maps a split to its file, e.g. ``{"train": {"path": ..., "num_jets": N}}``.
    ``extra`` keys are added at the top level; a key that clashes with a built-in one raises.
    """
    meta: dict[str, Any] = {
        "salt_version": salt.__version__,
        "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git": {
            "commit": state.commit,
            "branch": state.branch,
            "dirty": state.dirty,
            "dirty_files": list(state.dirty_files),
            "repo_root": state.repo_root,
        },
        "command": shlex.join(sys.argv),
        "argv": list(sys.argv),
        "seed": seed,
        "num_params": num_params,
        "data": data_files,
        "versions": {
            "python": sys.version.split()[0],
            "salt": salt.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "h5py": _version("h5py"),
        },
        "host": {"hostname": socket.gethostname(), "user": _user(), "pid": os.getpid()},
        "cuda": _cuda(),
        "slurm": _slurm(),
    }
    for key, value in (extra or {}).items():
        if key in meta:
            raise ValueError(f"collect_metadata: extra key {key!r} clashes with a built-in key")
        meta[key] = value
    return {key: _plain(value, key) for key, value in meta.items()}

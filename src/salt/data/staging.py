"""Copies of the training data on a fast local disk (``data.move_files_temp``) and their cleanup.

`stage` copies the train and val files and the norm/class dicts into a fresh directory
``<temp_root>/salt-stage-<pid>-<random>`` and yields a `DataFiles` that points at the copies
(test files are not copied: evaluation reads them once). The directory is removed when the
``with`` block ends, however it ends:

* normally, with an exception, or with Ctrl-C (KeyboardInterrupt): ``finally``;
* with a signal while copying: SIGTERM, SIGINT and SIGHUP abort the copy whatever handler is
  installed, unless the signal is ignored (Slurm sends SIGKILL soon after SIGTERM, so a long
  copy must not run on); the directory is removed, then the signal goes to the handler that
  was there before (the default action terminates the process; a flag-setting handler such
  as the training loop's stop request records it and `StagingInterrupted` is raised);
* with a signal while the block runs, when nobody handles that signal (its default action
  would kill the process without cleanup): the same, so `stage` is safe on its own too. The
  training loop's own handlers are left alone.

A kill -9 cannot clean up. Each directory holds an owner file (pid, host, boot id, process
start time), so the next `stage` with the same temp root removes copies whose owner process
is gone; copies of live processes, other users' and other hosts' are never touched, so runs
sharing a temp root do not collide. Files are copied under a temporary name and renamed when
complete, so a half-copied file is never read.

On ``/dev/shm`` the copies live in RAM, which Slurm counts against the job's memory limit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
from tqdm import tqdm

from salt.errors import StagingError, StagingInterrupted
from salt.signals import IF_DEFAULT, UNLESS_IGNORED, Catch
from salt.utils.atomic import atomic_write_text, temp_name

if TYPE_CHECKING:
    from salt.data.build import DataFiles

__all__ = [
    "OWNER_FILE",
    "Owner",
    "StagingError",
    "StagingInterrupted",
    "remove_stale",
    "stage",
]

log = logging.getLogger("salt")

PREFIX = "salt-stage-"
OWNER_FILE = "salt-owner.json"
_DIR_RE = re.compile(rf"^{PREFIX}\d+-\w+$")
_TRASH_SUFFIX = ".removing"  # a stale or finished directory being deleted: always garbage
DEFAULT_MARGIN = 256 * 2**20  # free space left after the copies, bytes
UNOWNED_AGE_S = 3600.0  # a directory without a readable owner file older than this is stale
CHUNK = 16 * 2**20

# Signals that turn into `StagingInterrupted` while staged copies exist. The copy is aborted
# on SIGTERM, SIGINT and SIGHUP whatever handler is installed (Slurm: SIGTERM, then SIGKILL);
# SIGUSR1/2 are taken only where nobody handles them (default action: terminate without
# cleanup): the loop uses them for "save and requeue", which must reach its handler.
_SIGNALS = {
    "SIGTERM": UNLESS_IGNORED,
    "SIGINT": UNLESS_IGNORED,
    "SIGHUP": UNLESS_IGNORED,
    "SIGUSR1": IF_DEFAULT,
    "SIGUSR2": IF_DEFAULT,
}


# ---- who owns a staging directory ----------------------------------------------------------
def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _boot_id() -> str | None:
    text = _read("/proc/sys/kernel/random/boot_id")
    return text.strip() if text else None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process, None when it is gone."""
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces
    return fields[0], int(fields[19])


@dataclass(frozen=True)
class Owner:
    """The process that owns a staging directory; enough to tell later whether it is gone."""

    pid: int
    hostname: str
    started: str  # wall-clock time, for people
    boot_id: str | None = None  # pids restart after a reboot
    pid_ns: str | None = None  # pids of another container's namespace are not ours to check
    start_ticks: int | None = None  # tells a reused pid from the owner

    @classmethod
    def current(cls) -> Owner:
        stat = _proc_stat(os.getpid())
        return cls(
            pid=os.getpid(),
            hostname=socket.gethostname(),
            started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            boot_id=_boot_id(),
            pid_ns=_pid_namespace(),
            start_ticks=stat[1] if stat else None,
        )

    def write(self, directory: Path) -> None:
        atomic_write_text(directory / OWNER_FILE, json.dumps(dataclasses.asdict(self)) + "\n")

    @classmethod
    def read(cls, directory: Path) -> Owner | None:
        """The owner recorded in ``directory``; None when missing or unreadable."""
        try:
            data = json.loads((directory / OWNER_FILE).read_text())
            fields = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in fields})
        except (OSError, ValueError, TypeError):
            return None

    def is_gone(self) -> bool:
        """Whether the owner has certainly exited; False whenever that cannot be known."""
        if self.hostname != socket.gethostname():
            return False  # a temp root on a shared file system: not ours to judge
        boot = _boot_id()
        if self.boot_id and boot and self.boot_id != boot:
            return True  # the machine rebooted since
        if self.pid_ns and self.pid_ns != _pid_namespace():
            return False  # another container's pids
        if not os.path.exists("/proc/self/stat"):  # no procfs: the pid is all we have
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
            return False
        stat = _proc_stat(self.pid)
        if stat is None:
            return True
        state, ticks = stat
        if state in ("Z", "X"):
            return True  # exited, not yet reaped: it cannot clean up anymore
        return self.start_ticks is not None and ticks != self.start_ticks  # pid reused


# ---- stale copies ----------------------------------------------------------------------------
def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        log.warning("salt: could not remove all of %s; remove it by hand", path)


def _discard(path: Path) -> None:
    """Remove a staging directory: renamed first, so it stops looking like one at once."""
    trash = path.with_name(f".{path.name}{_TRASH_SUFFIX}")
    try:
        path.rename(trash)
    except FileNotFoundError:
        return  # someone else removed it
    except OSError:
        trash = path
    _rmtree(trash)


def remove_stale(temp_root: str | Path) -> list[Path]:
    """Remove the staging directories under ``temp_root`` whose owner process is gone.

    Only this user's ``salt-stage-*`` directories are considered: those whose owner exited on
    this host (after a kill -9, a node crash, a reboot), and those without a readable owner
    file last changed more than an hour ago. Returns the directories removed.
    """
    root = Path(temp_root)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return removed
    uid = os.getuid() if hasattr(os, "getuid") else None
    for entry in entries:
        path = Path(entry.path)
        try:
            st = entry.stat(follow_symlinks=False)
            if not entry.is_dir(follow_symlinks=False) or (uid is not None and st.st_uid != uid):
                continue
        except OSError:
            continue
        if entry.name.startswith(f".{PREFIX}") and entry.name.endswith(_TRASH_SUFFIX):
            _rmtree(path)  # an earlier removal was interrupted
            continue
        if not _DIR_RE.match(entry.name):
            continue
        owner = Owner.read(path)
        if owner is None:
            age = time.time() - st.st_mtime
            if age < UNOWNED_AGE_S:
                continue  # may be in the instant between its creation and its owner file
            reason = f"no owner file, last changed {age / 3600:.1f} h ago"
        elif owner.is_gone():
            reason = (
                f"its process {owner.pid} on {owner.hostname}, started {owner.started}, is gone"
            )
        else:
            continue
        log.info("salt: removing stale staged data %s (%s)", path, reason)
        _discard(path)
        removed.append(path)
    return removed


# ---- copying -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Copy:
    src: Path
    rel: Path  # inside the staging directory
    size: int


def _virtual_dataset(name: str, obj: object) -> bool | None:
    return True if isinstance(obj, h5py.Dataset) and obj.is_virtual else None


def _is_virtual(path: Path) -> bool:
    """Whether an HDF5 file holds virtual datasets (their data lives in other files)."""
    try:
        if not h5py.is_hdf5(path):
            return False
        with h5py.File(path, "r") as f:
            return f.visititems(_virtual_dataset) is True  # stops at the first one found
    except OSError:
        return False  # unreadable: the loader reports it, with the file's name


def _plan(files: DataFiles) -> tuple[list[_Copy], dict[Path, Path]]:
    """What to copy where: ``<n>/<name>``, one ``n`` per source directory, so files with the
    same name in different directories do not collide and the dicts stay beside the files."""
    copies: list[_Copy] = []
    where: dict[Path, Path] = {}  # source path as given -> path inside the staging directory
    seen: dict[str, Path] = {}  # real path -> staged path: a file listed twice is copied once
    dirs: dict[Path, int] = {}
    sources = [*files.train, *files.val, files.norm_dict]
    if files.class_dict is not None:
        sources.append(files.class_dict)
    for src in map(Path, sources):
        if src in where:
            continue
        real = os.path.realpath(src)
        if real in seen:
            where[src] = seen[real]
            continue
        try:
            st = os.stat(real)
        except OSError as err:
            raise StagingError(f"{src}: cannot stage it: {err.strerror}") from err
        if not stat.S_ISREG(st.st_mode):
            raise StagingError(f"{src}: cannot stage it: not a regular file")
        if _is_virtual(src):
            log.warning(
                "salt: %s holds HDF5 virtual datasets, whose data lives in other files; "
                "it is read in place, not staged",
                src,
            )
            where[src] = src
            continue
        parent = src.absolute().parent
        rel = Path(str(dirs.setdefault(parent, len(dirs)))) / src.name
        copies.append(_Copy(src, rel, st.st_size))
        where[src] = seen[real] = rel
    return copies, where


def _prepare_root(temp_root: str | Path) -> Path:
    """The temp root, created (mode 0o700: staged data is nobody else's) when missing."""
    root = Path(os.path.expandvars(os.path.expanduser(str(temp_root)))).absolute()
    missing = []
    p = root
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        for d in reversed(missing):
            with contextlib.suppress(FileExistsError):
                d.mkdir(mode=0o700)
    except OSError as err:
        raise StagingError(
            f"data.move_files_temp={root}: cannot create it: {err.strerror}"
        ) from err
    if not root.is_dir():
        raise StagingError(f"data.move_files_temp={root}: not a directory")
    if not os.access(root, os.W_OK | os.X_OK):
        raise StagingError(f"data.move_files_temp={root}: not writable")
    return root


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _check_space(root: Path, needed: int, margin: int) -> None:
    free = shutil.disk_usage(root).free
    if free < needed + margin:
        raise StagingError(
            f"data.move_files_temp={root}: not enough free space to stage the data: "
            f"{_size(needed)} ({needed} bytes) needed plus a margin of {_size(margin)}, "
            f"{_size(free)} ({free} bytes) free. Free some space, choose another "
            "directory, or set data.move_files_temp=null to read the files in place."
        )


def _create_dir(root: Path) -> Path:
    directory = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root))
    Owner.current().write(directory)
    return directory


def _copy_file(copy: _Copy, dst: Path, bar: tqdm) -> None:
    """Copy under a temporary name, check the size, then rename: complete or absent."""
    dst.parent.mkdir(exist_ok=True)
    tmp = dst.with_name(temp_name(dst.name))
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    try:
        with open(copy.src, "rb") as fi, open(tmp, "xb") as fo:
            while n := fi.readinto(buf):
                fo.write(view[:n])
                bar.update(n)
        copied = tmp.stat().st_size
        if copied != copy.size:
            raise StagingError(
                f"{copy.src}: changed while being staged ({copy.size} bytes when listed, "
                f"{copied} copied)"
            )
        os.replace(tmp, dst)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise StagingError(
                f"{dst.parent.parent}: no space left while staging {copy.src}; "
                "set data.move_files_temp to a directory with more space, or to null"
            ) from err
        raise StagingError(f"cannot stage {copy.src} to {dst}: {err.strerror or err}") from err


def _copy_all(copies: list[_Copy], directory: Path, progress: bool) -> None:
    total = sum(c.size for c in copies)
    log.info("salt: staging %d files (%s) to %s", len(copies), _size(total), directory)
    start = time.monotonic()
    tty = sys.stderr.isatty()
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="salt: staging data",
        disable=not progress,
        mininterval=0.5 if tty else 30.0,  # a few lines, not thousands, in a Slurm log
        file=sys.stderr,
    ) as bar:
        for copy in copies:
            _copy_file(copy, directory / copy.rel, bar)
    seconds = max(time.monotonic() - start, 1e-6)
    log.info("salt: staged %s in %.1f s (%s/s)", _size(total), seconds, _size(total / seconds))


def staging_root(value: Any) -> str | None:
    """`data.move_files_temp`: a directory, null (read in place), or auto: the job's own
    `$TMPDIR` under Slurm (a per-job local disk where the cluster provides one), else null."""
    if value is None or value is False or str(value).strip() == "":
        return None
    if str(value).strip().lower() != "auto":
        return str(value)
    tmp = os.environ.get("TMPDIR") if os.environ.get("SLURM_JOB_ID") else None
    if tmp:
        log.info("salt: data.move_files_temp=auto -> %s (the Slurm job's TMPDIR)", tmp)
    else:
        log.info("salt: data.move_files_temp=auto: not in a Slurm job; reading the files in place")
    return tmp or None


# ---- the entry point -----------------------------------------------------------------------
@contextlib.contextmanager
def stage(
    files: DataFiles,
    temp_root: str | Path,
    *,
    progress: bool = True,
    margin: int = DEFAULT_MARGIN,
) -> Iterator[DataFiles]:
    """Copy the train/val files and the dicts to a fresh directory under ``temp_root``; yield
    ``files`` pointing at the copies (``test`` unchanged); remove the copies on exit.

    Stale copies of dead runs under ``temp_root`` are removed first. Raises `StagingError`
    when ``temp_root`` lacks the space for the copies plus ``margin`` bytes, and
    `StagingInterrupted` when a signal stops the copy and its previous handler only records
    it. Signals are handled only when called from the main thread.
    """
    root = _prepare_root(temp_root)
    remove_stale(root)
    copies, where = _plan(files)
    _check_space(root, sum(c.size for c in copies), margin)
    # Signals abort the copy at once, but never while the directory is created or removed
    # (`held`); after the copy, the signals somebody else handles are theirs again. On exit a
    # caught signal goes to the handler it replaced, so the process ends as it would have
    # without staging (a handler that only records it: `StagingInterrupted` goes on).
    signals = Catch(_SIGNALS, act=_interrupt)
    try:
        with signals:
            directory: Path | None = None
            try:
                with signals.held():
                    directory = _create_dir(root)
                _copy_all(copies, directory, progress)
                staged = dataclasses.replace(
                    files,
                    train=[_moved(p, where, directory) for p in files.train],
                    val=[_moved(p, where, directory) for p in files.val],
                    norm_dict=_moved(files.norm_dict, where, directory),
                    class_dict=_moved(files.class_dict, where, directory)
                    if files.class_dict is not None
                    else None,
                )
                signals.release_handled()
                yield staged
            finally:
                if directory is not None:
                    with signals.held():
                        _discard(directory)
                        log.info("salt: removed the staged data %s", directory)
    finally:
        if signals.first is not None:
            signals.pass_on(signals.first, default_action=True)


def _interrupt(signum: int) -> None:
    raise StagingInterrupted(signum)


def _moved(path: Path, where: dict[Path, Path], directory: Path) -> Path:
    target = where[Path(path)]
    return target if target.is_absolute() else directory / target

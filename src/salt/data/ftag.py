"""FTAG HDF5 files: variables by name, normalisation, labels, and the checks around them.

A file holds structured datasets (``jets``: one row per jet; ``tracks``, ``flows``,
``electrons``...: ``(n_jets, n_slots)`` with a ``valid`` flag). Each *input type* of the model
reads its variables from one dataset (``input_map``; by default the dataset of its own name):
``jets`` and ``global`` one row per jet, every other type (an *object type*) a sequence of
objects per jet. Everything that is read from one dataset is read
in a single HDF5 call into a packed float32 record, so HDF5 does the type conversion in C and the
result is viewed as a plain ``float32`` array without another copy.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import yaml

from salt.data.labels import LabelsConfig, LabelSpec, class_indices
from salt.data.selections import Cut
from salt.errors import DataError
from salt.utils.input_types import is_object_type, object_types
from salt.utils.names import closest_available

DEFAULT_INPUT_MAP: dict[str, str] = {"jets": "jets", "tracks": "tracks", "global": "jets"}
VALID = "valid"
FLOAT32_EXACT = 2**24  # float32 holds every integer up to this exactly
NO_TRACKS_PROBE = 100  # jets read at open to warn about a file without any real track
log = logging.getLogger("salt")


# what a failed open means, by errno: each cause gets its own words (see `file_error`)
_LOCKED = (errno.EAGAIN, errno.EWOULDBLOCK)  # flock(LOCK_NB) refused: another process holds it
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# what each YAML dict holds, for messages
YAML_LAYOUT = {
    "norm_dict": "a mapping of input -> variable -> {mean, std}",
    "class_dict": "a mapping of input -> label -> [weight per class]",
}
MAX_YAML_BYTES = 64 << 20  # a norm/class dict is kilobytes; a larger file is the wrong file


def dataset_of(input_map: Mapping[str, str], input_type: str) -> str:
    """The dataset an input type reads: ``input_map``'s entry, else the type's own name."""
    return input_map.get(input_type, input_type)


@dataclass(frozen=True)
class ObjectOptions:
    """How the objects of each type are read (``data.num_inputs``, ``data.selections``,
    ``data.noise``), by object type."""

    num_inputs: Mapping[str, int] = field(default_factory=dict)  # keep the first N as stored
    selections: Mapping[str, Sequence[Cut]] = field(default_factory=dict)  # drop failing ones
    # variable -> std of the multiplicative Gaussian noise N(1, std), at training time
    noise: Mapping[str, Mapping[str, float]] = field(default_factory=dict)


def file_error(
    path: str | Path, err: OSError, what: str = "file", key: str | None = None, hdf5: bool = False
) -> DataError:
    """The one-line error for a file that could not be opened for reading, by its cause.

    ``what`` names the file's role ("file", "norm_dict", ...), ``key`` the setting it came from
    (e.g. ``data.train_file``); ``hdf5``: an error with no OS cause means a damaged HDF5 file.
    Every place that opens a data file or dict reports its failure through here.
    """
    path = Path(path)
    via = f" ({key})" if key else ""
    expected = "an HDF5 file" if hdf5 else f"the {what} YAML file"
    text = _one_line(err)
    code = err.errno
    if code is None and path.is_dir():  # HDF5 versions that do not pass the errno on
        code = errno.EISDIR
    if code == errno.ENOENT:
        return DataError(f"{path}: {what} not found{via}.")
    if code == errno.EISDIR:
        many = " (for many files: a glob such as dir/*.h5, or a list)" if hdf5 else ""
        return DataError(f"{path}: is a directory{via}; expected {expected}{many}.")
    if code == errno.ENOTDIR:
        return DataError(
            f"{path}: a part of the path is not a directory{via}; expected {expected}."
        )
    if code in (errno.EACCES, errno.EPERM):
        return DataError(
            f"{path}: permission denied{via}: user {_user()} may not read it (or enter a "
            f"directory above it); expected {expected} readable by this user (check ls -l)."
        )
    if "unable to lock file" in text:
        if code in _LOCKED:
            # a reader's shared lock is refused only while a writer holds the exclusive one:
            # the file is being written, and disabling the lock would read it half-written
            return DataError(
                f"{path}: unable to lock the file{via}: another process has it open for "
                "writing (HDF5 file locking); expected a finished file: wait until the writer "
                "closes it, or read a copy made after."
            )
        # e.g. ENOSYS/ENOLCK/EOPNOTSUPP: the filesystem (some NFS, Lustre) has no locks
        return DataError(
            f"{path}: unable to lock the file{via}: this filesystem does not support HDF5 file "
            f"locking ({err.strerror or text}); if nothing writes the file while salt reads "
            "it, set HDF5_USE_FILE_LOCKING=FALSE (or BEST_EFFORT) in the environment."
        )
    if hdf5 and code is None:  # the wording of old, for this case only
        return DataError(
            f"{path}: not a readable HDF5 file (truncated or corrupt?): {text}. "
            "Expected a complete HDF5 file; copy or produce it again."
        )
    return DataError(f"{path}: cannot read the {what}{via}: {err.strerror or text}.")


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a uid without a passwd entry (containers)
        return f"uid {os.geteuid()}"


def check_file(path: str | Path, what: str = "file", key: str | None = None) -> Path:
    """``path`` as a Path if it is a regular file this process may open for reading; else the
    `file_error` naming why (missing, a directory, no permission)."""
    path = Path(path)
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
            raise DataError(f"{path}: not a regular file{f' ({key})' if key else ''}.")
        os.close(os.open(path, os.O_RDONLY))  # the permission as the kernel decides it
    except OSError as err:
        raise file_error(path, err, what, key) from None
    return path


def open_h5(path: str | Path, key: str | None = None) -> h5py.File:
    """Open an HDF5 file for reading; a failure is one `file_error` line naming its cause."""
    path = Path(path)
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise file_error(path, err, "file", key, hdf5=True) from None


def _one_line(err: BaseException) -> str:
    """An HDF5 library message on one line: a user error is reported as a single line."""
    return " ".join(str(err).split())


class YamlDict(dict):
    """A mapping read from a YAML file; ``path`` names the file in later messages."""

    path: Path | None = None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: the problem and where it is."""
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return _one_line(err).replace(' in "<byte string>",', "")


def load_yaml_dict(path: str | Path, what: str, key: str | None = None) -> YamlDict:
    """A YAML mapping (norm_dict, class_dict); each way it can fail is one line naming the file."""
    path = check_file(path, what, key)
    via = f" ({key})" if key else ""
    expected = YAML_LAYOUT.get(what, "a mapping")
    try:
        with path.open("rb") as f:
            head = f.read(len(HDF5_SIGNATURE))
            if head == HDF5_SIGNATURE:
                raise DataError(f"{path}: is an HDF5 file{via}; expected the {what} YAML file.")
            if path.stat().st_size > MAX_YAML_BYTES:
                raise DataError(
                    f"{path}: {path.stat().st_size >> 20} MiB is too large for a {what}{via}; "
                    f"expected a small YAML file ({expected})."
                )
            data = yaml.safe_load(head + f.read())
    except OSError as err:
        raise file_error(path, err, what, key) from None
    except yaml.YAMLError as err:
        raise DataError(
            f"{path}: {what}{via} is not valid YAML ({_yaml_problem(err)}); expected {expected}."
        ) from None
    if not isinstance(data, dict):
        got = "an empty file" if data is None else type(data).__name__
        raise DataError(f"{path}: {what}{via} must be {expected}, got {got}.")
    out = YamlDict(data)
    out.path = path
    return out


def _norm_section(
    norm_dict: Mapping, input_type: str, dataset: str, where: str
) -> tuple[str, Mapping]:
    """The norm_dict section for an input type: its own name first, then its dataset's."""
    for key in (input_type, dataset):
        if key in norm_dict:
            section = norm_dict[key]
            if not isinstance(section, Mapping):
                got = "nothing" if section is None else type(section).__name__
                raise DataError(
                    f"{where}norm_dict['{key}'] must be a mapping of variable -> {{mean, std}}, "
                    f"got {got}."
                )
            return key, section
    raise DataError(
        f"{where}norm_dict has no section for input '{input_type}' (dataset '{dataset}'); "
        f"sections: "
        f"{sorted(norm_dict)}."
    )


def _number(value: Any) -> float:
    """A YAML number as float; a bool or anything else is refused (``std: true`` is a typo)."""
    if isinstance(value, bool):
        raise TypeError(value)
    return float(value)


def norm_arrays(
    norm_dict: Mapping, input_type: str, dataset: str, variables: Sequence[str], source: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """(mean, 1/std) as float32 arrays for ``variables``, checked for presence and std > 0.

    Messages name the norm_dict's file when it was read from one (`load_yaml_dict`), else
    ``source``.
    """
    source = str(getattr(norm_dict, "path", None) or source)
    where = f"{source}: " if source else ""
    key, section = _norm_section(norm_dict, input_type, dataset, where)
    mean, inv_std = [], []
    for var in variables:
        if var not in section:
            raise DataError(
                f"{where}norm_dict['{key}'] has no entry for variable '{var}'."
                f"{closest_available(var, list(section))}"
            )
        entry = section[var]
        try:
            m, s = _number(entry["mean"]), _number(entry["std"])
        except (KeyError, TypeError, ValueError):
            raise DataError(
                f"{where}norm_dict['{key}']['{var}'] must be {{mean: float, std: float}}, "
                f"got {entry!r}."
            ) from None
        if not np.isfinite(np.float32(m)):  # the model's float32 must hold it too
            raise DataError(
                f"{where}norm_dict['{key}']['{var}'] has mean={m}: expected a finite mean."
            )
        if not np.isfinite(s) or s <= 0 or not np.isfinite(np.float32(1.0 / s)):
            raise DataError(
                f"{where}norm_dict['{key}']['{var}'] has mean={m}, std={s}: std must be finite "
                f"and > 0 (a constant variable carries no information; drop it)."
            )
        mean.append(m)
        inv_std.append(1.0 / s)
    return np.asarray(mean, np.float32), np.asarray(inv_std, np.float32)


def input_norm(
    norm_dict: Mapping, input_map: Mapping[str, str] | None = None, source: str = ""
) -> Callable[[str, Sequence[str]], tuple[np.ndarray, np.ndarray]]:
    """``(input_type, variables) -> (mean, 1/std)``: the numbers the loader normalises them
    with (`norm_arrays` on the type's dataset), for a model that needs its raw inputs back
    (``model.edges``) without reading the norm_dict itself."""
    datasets = {**DEFAULT_INPUT_MAP, **dict(input_map or {})}

    def lookup(input_type: str, variables: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        dataset = dataset_of(datasets, input_type)
        return norm_arrays(norm_dict, input_type, dataset, variables, source)

    return lookup


def _as_spec(spec: LabelSpec | Mapping[int, int] | None) -> LabelSpec:
    if isinstance(spec, LabelSpec):
        return spec
    if spec is None:
        return LabelSpec()
    return LabelSpec(label_map={int(k): int(v) for k, v in dict(spec).items()})


@dataclass
class _LabelPlan:
    input_type: str
    name: str
    column: int
    spec: LabelSpec
    stored: np.dtype | None = None  # the file's dtype, set when the file is checked
    # read as int64 from the records, not through the float32 record (`FLOAT32_EXACT`)
    exact: bool = False


@dataclass
class _InputPlan:
    input_type: str
    columns: slice | np.ndarray
    mean: np.ndarray
    inv_std: np.ndarray
    variables: list[str]
    noise: np.ndarray | None = None  # per variable: std of the N(1, std) factor (0: none)


@dataclass
class _DatasetPlan:
    """Everything read from one dataset in one call."""

    name: str
    fields: list[str] = field(default_factory=list)
    inputs: list[_InputPlan] = field(default_factory=list)
    labels: list[_LabelPlan] = field(default_factory=list)
    valid_column: int | None = None
    valid_is_bool: bool = True  # a 0/1 integer or float flag is checked for other values
    per_slot: bool | None = None  # the layout the model needs: (n_jets, n_slots) or (n_jets,)
    max_slots: int | None = None  # data.num_inputs: read only the first slots
    cuts: list[tuple[int, Cut]] = field(default_factory=list)  # (column, cut): data.selections
    input_types: list[str] = field(default_factory=list)  # what reads it, for messages
    needed_by: dict[str, str] = field(default_factory=dict)  # field -> config key, for messages

    def expect(self, input_type: str, per_slot: bool, input_map: Mapping[str, str]) -> None:
        """Record that ``input_type`` reads this dataset; one dataset has one layout."""
        if self.per_slot is not None and self.per_slot != per_slot:
            slot_types, row_types = (
                (self.input_types, [input_type])
                if self.per_slot
                else ([input_type], self.input_types)
            )
            raise DataError(
                f"data.input_map {dict(input_map)} reads {' and '.join(slot_types)} (a sequence "
                f"per jet) and {' and '.join(row_types)} (one row per jet) from the same dataset "
                f"'{self.name}'; expected per-jet and per-track inputs in different datasets."
            )
        self.per_slot = per_slot
        if input_type not in self.input_types:
            self.input_types.append(input_type)

    def column(self, name: str, needed_by: str | None = None) -> int:
        if name not in self.fields:
            self.fields.append(name)
        if needed_by:
            self.needed_by.setdefault(name, needed_by)
        return self.fields.index(name)

    @cached_property
    def read_dtype(self) -> np.dtype:
        return np.dtype([(f, np.float32) for f in self.fields])


@dataclass
class Chunk:
    """The needed fields of a contiguous range of jets as float32, real tracks first; cut into
    batches by :meth:`FTAGReader.batch`, which normalises only what a batch needs."""

    start: int  # file row of the first jet
    raw: dict[str, np.ndarray]  # dataset -> float32 (n, [slots,] fields): the plan's fields
    valid: dict[str, np.ndarray]  # per-slot datasets -> bool (n, slots), True = real
    num_real: dict[str, np.ndarray]  # per-slot datasets -> real slots per jet
    # dataset -> label -> int64 values of labels float32 cannot hold exactly (`_LabelPlan.exact`)
    exact: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(next(iter(self.raw.values())))


class FTAGReader:
    """Reads normalised inputs and labels from one FTAG file, by variable name.

    The file is opened lazily, so the object can be created in the main process and used in
    DataLoader workers (each opens its own handle).
    """

    def __init__(
        self,
        path: str | Path,
        variables: Mapping[str, Sequence[str]],
        norm_dict: Mapping,
        labels: LabelsConfig | None = None,
        input_map: Mapping[str, str] | None = None,
        nan_policy: str = "error",
        compact_tracks: bool = True,
        options: ObjectOptions | None = None,
    ) -> None:
        if nan_policy not in ("error", "replace"):
            raise DataError(f"nan_policy must be 'error' or 'replace', got '{nan_policy}'.")
        self.path = Path(path)
        self.nan_policy = nan_policy
        self.compact_tracks = compact_tracks
        self.input_map = {**DEFAULT_INPUT_MAP, **dict(input_map or {})}
        self._file: h5py.File | None = None
        _ = self.file  # fail early, naming the file, if it is missing or unreadable
        options = options or ObjectOptions()
        self.plans: dict[str, _DatasetPlan] = {}
        for input_type, var_list in variables.items():
            if not var_list:
                continue
            dataset = self._dataset_for(input_type)
            plan = self.plans.setdefault(dataset, _DatasetPlan(dataset))
            plan.expect(input_type, is_object_type(input_type), self.input_map)
            cols = _as_slice([plan.column(v, f"model.variables.{input_type}") for v in var_list])
            mean, inv_std = norm_arrays(norm_dict, input_type, dataset, var_list, str(self.path))
            noise = _noise_factors(options.noise.get(input_type), var_list, input_type)
            plan.inputs.append(_InputPlan(input_type, cols, mean, inv_std, list(var_list), noise))
        for input_type, label_specs in (labels or {}).items():
            dataset = self._dataset_for(input_type)
            plan = self.plans.setdefault(dataset, _DatasetPlan(dataset))
            plan.expect(input_type, is_object_type(input_type), self.input_map)
            for name, spec in label_specs.items():
                spec = _as_spec(spec)
                source = f"model.tasks.{spec.task}.label" if spec.task else f"a {input_type} label"
                plan.labels.append(_LabelPlan(input_type, name, plan.column(name, source), spec))
        self._plan_options(options, variables)
        self.num_jets, self.num_slots = self._validate()

    def _plan_options(self, options: ObjectOptions, variables: Mapping[str, Sequence[str]]) -> None:
        """Attach data.num_inputs and data.selections to the datasets of their types."""
        for key, per_type in (
            ("num_inputs", options.num_inputs),
            ("selections", options.selections),
        ):
            for input_type in per_type:
                if input_type not in variables or not is_object_type(input_type):
                    objects = object_types(variables)
                    raise DataError(
                        f"data.{key}.{input_type}: the model reads no objects of type "
                        f"'{input_type}'; its object types are {objects}"
                    )
        for input_type, count in options.num_inputs.items():
            plan = self.plans[self._dataset_for(input_type)]
            plan.max_slots = int(count)
        for input_type, cuts in options.selections.items():
            plan = self.plans[self._dataset_for(input_type)]
            for cut in cuts:
                column = plan.column(cut.variable, f"data.selections.{input_type} ({cut.text})")
                plan.cuts.append((column, cut))

    def _dataset_for(self, input_type: str) -> str:
        return dataset_of(self.input_map, input_type)

    @property
    def file(self) -> h5py.File:
        if self._file is None:
            self._file = open_h5(self.path)
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getstate__(self) -> dict[str, Any]:
        # h5py handles cannot cross process boundaries; workers reopen the file.
        return {**self.__dict__, "_file": None}

    def _validate(self) -> tuple[int, dict[str, int]]:
        """Check datasets, variables and shapes once, up front; return (n_jets, slots read per
        object dataset)."""
        lengths: dict[str, int] = {}
        num_slots: dict[str, int] = {}
        for name, plan in self.plans.items():
            if name not in self.file:
                raise DataError(
                    f"{self.path}: no dataset '{name}'. Datasets in file: {sorted(self.file)}."
                )
            ds = self.file[name]
            if not isinstance(ds, h5py.Dataset) or ds.dtype.names is None:
                raise DataError(
                    f"{self.path}: '{name}' is not a structured dataset; expected one named "
                    f"field per variable (an FTAG '{name}' dataset)."
                )
            available = list(ds.dtype.names)
            self._check_layout(name, plan, ds.shape, available)
            if plan.per_slot:
                plan.valid_column = plan.column(VALID)
                num_slots[name] = min(ds.shape[1], plan.max_slots or ds.shape[1])
            for var in plan.fields:
                if var not in available:
                    raise DataError(
                        f"{self.path}: dataset '{name}' has no variable '{var}'; expected by "
                        f"{plan.needed_by.get(var, 'the model')}."
                        f"{closest_available(var, available)}"
                    )
            self._check_dtypes(name, plan, ds.dtype)
            lengths[name] = ds.shape[0]
        if len(set(lengths.values())) > 1:
            raise DataError(
                f"{self.path}: datasets have different numbers of jets: {lengths}; each must "
                "have one row per jet."
            )
        n = next(iter(lengths.values()), 0)
        if n == 0:
            raise DataError(
                f"{self.path}: datasets {sorted(lengths)} are empty (0 jets); expected at least "
                "one jet."
            )
        for name, plan in self.plans.items():
            if plan.per_slot and "tracks" in plan.input_types:  # rarer objects may be absent
                self._warn_if_no_tracks(name)
        return n, num_slots

    def _check_dtypes(self, name: str, plan: _DatasetPlan, dtype: np.dtype) -> None:
        """Every field read is stored as numbers (HDF5 would parse or truncate anything else
        silently, or fail with a traceback); labels and the valid flag are noted for `read`."""
        assert dtype.fields is not None
        for var in plan.fields:
            stored = dtype.fields[var][0]
            problem = not_numeric(stored)
            if var == VALID and plan.per_slot:
                if problem:
                    raise DataError(
                        f"{self.path}: dataset '{name}' field '{VALID}' is stored as {problem}; "
                        "expected booleans (or 0/1 numbers) marking the real tracks."
                    )
                plan.valid_is_bool = stored.kind == "b"
            elif problem:
                raise DataError(
                    f"{self.path}: dataset '{name}' variable '{var}' is stored as {problem}; "
                    f"expected a number (bool, integer or float) for "
                    f"{plan.needed_by.get(var, 'the model')}."
                )
        for lp in plan.labels:
            lp.stored = dtype.fields[lp.name][0]
            # a label_map key beyond float32's exact integers (a nucleus' PDG ID 1000010020)
            # is matched against the stored integers, not their float32 rounding
            keys = lp.spec.label_map or {}
            lp.exact = (
                lp.stored.kind in "iu"
                and lp.stored.itemsize > 2
                and any(abs(int(k)) > FLOAT32_EXACT for k in keys)
            )

    def _warn_if_no_tracks(self, name: str) -> None:
        """Warn when the first jets have no real track at all: a 'valid' flag written wrongly
        (all False) trains on padding alone without any error. One HDF5 chunk is cheap."""
        ds = self.file[name]
        first = min(len(ds), max(NO_TRACKS_PROBE, ds.chunks[0] if ds.chunks else 0))
        first = min(first, 10 * NO_TRACKS_PROBE)
        if np.asarray(ds.fields(VALID)[:first]).any():
            return
        jets = "no jet" if first == len(ds) else f"none of the first {first} jets"
        log.warning(
            "salt: %s: %s has a valid track (dataset '%s', field '%s' is all false); the "
            "model sees no tracks: check how the file was written",
            self.path,
            jets,
            name,
            VALID,
        )

    def _check_layout(
        self, name: str, plan: _DatasetPlan, shape: tuple[int, ...], fields: list[str]
    ) -> None:
        """The dataset's shape is the one its input types need: a 1-D ``tracks`` would be read
        as jet-level and fail deep in the model."""
        readers = " and ".join(plan.input_types)
        if plan.per_slot:
            problem = None
            if len(shape) != 2:
                problem = f"has shape {shape}"
            elif VALID not in fields:
                problem = f"has shape {shape} but no '{VALID}' field"
            elif shape[1] == 0:
                problem = f"has shape {shape}: no track slots"
            if problem:
                raise DataError(
                    f"{self.path}: dataset '{name}' {problem}; the model reads {readers} as a "
                    f"sequence per jet: expected (n_jets, n_tracks) with a '{VALID}' field."
                )
        elif len(shape) != 1:
            raise DataError(
                f"{self.path}: dataset '{name}' has shape {shape}; the model reads {readers} as "
                "one row per jet: expected (n_jets,)."
            )

    def read(self, start: int, stop: int) -> Chunk:
        """Read jets [start, stop) as stored (whole records: HDF5 reads them fastest)."""
        raw, valid, num_real, exact = {}, {}, {}, {}
        for name, plan in self.plans.items():
            ds = self.file[name]
            shape, where = (stop - start, *ds.shape[1:]), np.s_[start:stop]
            if plan.per_slot:  # data.num_inputs: the first slots as stored
                shape = (shape[0], self.num_slots[name])
                where = np.s_[start:stop, : self.num_slots[name]]
            records = np.empty(shape, dtype=ds.dtype)
            try:
                ds.read_direct(records, where, np.s_[...])
            except (OSError, RuntimeError) as err:
                raise DataError(
                    f"{self.path}: reading dataset '{name}' rows {start}:{stop} failed (corrupt "
                    f"or truncated file?): {_one_line(err)}. Expected readable data; copy or "
                    "produce the file again."
                ) from None
            # whole records are read fastest; then the needed fields -> one packed float32
            # record each -> a plain float32 array (the view costs nothing)
            flat = records[plan.fields].astype(plan.read_dtype)
            flat = flat.view(np.float32).reshape(*records.shape, len(plan.fields))
            wide = {lp.name: records[lp.name].astype(np.int64) for lp in plan.labels if lp.exact}
            if plan.valid_column is not None:
                flag = flat[..., plan.valid_column]
                if not plan.valid_is_bool:
                    self._check_valid_values(name, flag, start)
                mask = flag != 0
                for column, cut in plan.cuts:  # data.selections: failing objects are padding
                    mask &= cut.passes(flat[..., column])
                if self.compact_tracks and not _is_prefix(mask):
                    order = np.argsort(~mask, axis=1, kind="stable")
                    flat = np.take_along_axis(flat, order[..., None], axis=1)
                    mask = np.take_along_axis(mask, order, axis=1)
                    wide = {k: np.take_along_axis(v, order, axis=1) for k, v in wide.items()}
                valid[name], num_real[name] = mask, mask.sum(axis=1)
            raw[name] = flat
            if wide:
                exact[name] = wide
        return Chunk(start, raw, valid, num_real, exact)

    def _check_valid_values(self, name: str, flag: np.ndarray, start: int) -> None:
        """A 'valid' flag stored as numbers must be 0 or 1: any other value (2, 0.5, NaN) means
        the field holds something else, and ``!= 0`` would silently call it a track."""
        bad = (flag != 0) & (flag != 1)
        if bad.any():
            jet, slot = (int(i) for i in np.argwhere(bad)[0])
            raise DataError(
                f"{self.path}: dataset '{name}' field '{VALID}' has the value "
                f"{flag[jet, slot]:g} at jet {start + jet} (slot {slot}); expected booleans "
                "(0 or 1) marking the real tracks."
            )

    def load(
        self, start: int, stop: int
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
        """Inputs, pad masks and labels of jets [start, stop), all slots kept."""
        return self.batch(self.read(start, stop), slice(None))

    def batch(
        self,
        chunk: Chunk,
        rows: np.ndarray | slice,
        widths: Mapping[str, int] | None = None,
        rng: np.random.Generator | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
        """Inputs (normalised float32, padded slots 0), pad masks and labels of ``rows``.

        ``widths`` keeps only the first slots of object datasets (real objects come first), by
        dataset; ``rng`` (training only) draws the ``data.noise`` factors.
        """
        inputs: dict[str, np.ndarray] = {}
        masks: dict[str, np.ndarray] = {}
        labels: dict[str, dict[str, np.ndarray]] = {}
        index = np.arange(len(chunk))[rows] + chunk.start  # file rows, for messages
        for name, plan in self.plans.items():
            per_slot = plan.valid_column is not None
            width = (widths or {}).get(name)
            flat = chunk.raw[name][rows, :width] if per_slot else chunk.raw[name][rows]
            mask = chunk.valid[name][rows, :width] if per_slot else None
            for ip in plan.inputs:
                x = flat[..., ip.columns]
                if rng is not None and ip.noise is not None:  # on the raw values, a copy
                    x = x * rng.normal(1.0, ip.noise, size=x.shape).astype(np.float32)
                x = np.subtract(x, ip.mean, dtype=np.float32)
                x *= ip.inv_std
                if mask is not None:
                    np.copyto(x, 0.0, where=~mask[..., None])
                    masks[ip.input_type] = ~mask
                self._check_finite(x, ip, index)
                inputs[ip.input_type] = x
            for lp in plan.labels:
                if lp.exact:
                    wide = chunk.exact[name][lp.name]
                    values = wide[rows, :width] if per_slot else wide[rows]
                else:
                    values = flat[..., lp.column]
                labels.setdefault(lp.input_type, {})[lp.name] = self._map_label(
                    values, lp, name, mask, index
                )
        return inputs, masks, labels

    def _check_finite(self, x: np.ndarray, ip: _InputPlan, index: np.ndarray) -> None:
        if np.isfinite(x.sum(dtype=np.float64)):
            return  # one cheap pass; only a non-finite sum needs a closer look
        bad = ~np.isfinite(x)
        if not bad.any():
            return
        if self.nan_policy == "replace":
            x[bad] = 0.0  # zero in normalised units is the variable's mean
            return
        idx = np.argwhere(bad)[0]
        var = ip.variables[idx[-1]]
        raise DataError(
            f"{self.path}: non-finite value (NaN/inf) in '{self._dataset_for(ip.input_type)}' "
            f"variable '{var}' at jet {int(index[idx[0]])}; expected finite inputs. Fix the "
            "file, or set data.nan_policy=replace to replace non-finite inputs by the variable's "
            "mean."
        )

    def _map_label(
        self,
        values: np.ndarray,
        lp: _LabelPlan,
        dataset: str,
        mask: np.ndarray | None,
        index: np.ndarray,
    ) -> np.ndarray:
        real = mask if mask is not None else np.ones(values.shape, dtype=bool)
        if lp.spec.continuous:  # a regression target: the value itself, never an integer
            out = values.astype(np.float32)  # a copy: the chunk is read again for other rows
            if lp.spec.weight:
                self._check_weights(out, lp, dataset, real, index)
            out[~real] = np.nan
            return out
        if values.dtype.kind == "f" and (lp.stored is None or lp.stored.kind == "f"):
            # integer labels: a NaN would become a huge negative integer below, a fraction
            # would be cut to an integer of another class without a word
            nonfinite = real & ~np.isfinite(values)
            if nonfinite.any():
                raise DataError(
                    f"{self.path}: '{dataset}' label '{lp.name}' has non-finite values (first at "
                    f"jet {int(index[np.argwhere(nonfinite)[0][0]])}); expected integer class "
                    "labels."
                )
            fraction = real & (values != np.trunc(values))
            if fraction.any():
                found = np.unique(values[fraction])[:5].tolist()
                raise DataError(
                    f"{self.path}: '{dataset}' label '{lp.name}' (stored as {lp.stored}) has "
                    f"non-integer values {found} (first at jet "
                    f"{int(index[np.argwhere(fraction)[0][0]])}); expected integer labels: "
                    "write the label as integers."
                )
        ints = values.astype(np.int64)
        mapped, unknown = class_indices(ints, lp.spec)
        bad = real & unknown
        if bad.any():
            found = np.unique(ints[bad]).tolist()
            first = int(index[np.argwhere(bad)[0][0]])
            if lp.spec.label_map:
                key = f"model.tasks.{lp.spec.task}.label_map" if lp.spec.task else "the map"
                raise DataError(
                    f"{self.path}: '{dataset}' label '{lp.name}' has values {found} not "
                    f"in its label_map {dict(lp.spec.label_map)} (first at jet {first}); "
                    f"expected only the map's keys. Add them to {key} (-1 to ignore them in the "
                    "loss)."
                )
            n = lp.spec.num_classes
            task = f"task {lp.spec.task}" if lp.spec.task else "the task"
            fix = f"model.tasks.{lp.spec.task}.label_map" if lp.spec.task else "a label_map"
            raise DataError(
                f"{self.path}: '{dataset}' label '{lp.name}' has values {found} outside "
                f"[0, {n}) (first at jet {first}); expected one of the {n} classes of {task}, or "
                f"-1 to ignore a {'track' if mask is not None else 'jet'}. Fix the file, or map "
                f"its values to classes with {fix}."
            )
        if mask is not None:
            mapped[~real] = -1
        return mapped

    def _check_weights(
        self, weights: np.ndarray, lp: _LabelPlan, dataset: str, real: np.ndarray, index: np.ndarray
    ) -> None:
        """A sample weight is a finite number >= 0: a negative one would reward a worse
        prediction (the loss has no minimum), a NaN would spoil the whole batch's loss."""
        bad = real & ~(np.isfinite(weights) & (weights >= 0))
        if not bad.any():
            return
        first = np.argwhere(bad)[0]
        key = f"model.tasks.{lp.spec.task}.sample_weight" if lp.spec.task else "a sample weight"
        raise DataError(
            f"{self.path}: '{dataset}' variable '{lp.name}' ({key}) has the weight "
            f"{weights[tuple(first)]:g} at jet {int(index[first[0]])} ({int(bad.sum())} such "
            "in this batch); expected finite weights >= 0. Fix the file, or give those jets "
            "weight 0."
        )


def _noise_factors(
    noise: Mapping[str, float] | None, variables: Sequence[str], input_type: str
) -> np.ndarray | None:
    """The std of the N(1, std) factor of each variable (0 for none), or None without noise."""
    if not noise:
        return None
    for var, std in noise.items():
        if var not in variables:
            raise DataError(
                f"data.noise.{input_type}.{var}: '{var}' is not an input of {input_type}; noise "
                f"applies to model.variables.{input_type}: {list(variables)}"
                f"{closest_available(var, list(variables))}"
            )
        if not (np.isfinite(std) and std >= 0):
            raise DataError(f"data.noise.{input_type}.{var}={std}: expected a std >= 0")
    return np.array([float(noise.get(v, 0.0)) for v in variables], dtype=np.float32)


def not_numeric(dtype: np.dtype) -> str | None:
    """What a field holds when it is not a number (None for bool, int and float), its dtype
    named, for the message."""
    if dtype.subdtype is not None:  # a fixed-size array per row: float() takes its first item
        base, shape = dtype.subdtype
        return f"an array of {'x'.join(map(str, shape))} {base} per row"
    if dtype.kind in "biuf":
        return None
    if dtype.kind in "SU":
        return f"strings (dtype {dtype})"
    vlen_str = h5py.check_string_dtype(dtype)
    if vlen_str is not None:
        return f"variable-length strings (dtype {vlen_str.encoding} vlen str)"
    vlen = h5py.check_vlen_dtype(dtype)
    if vlen is not None:
        return f"variable-length sequences of {vlen} (dtype vlen {vlen})"
    if dtype.names:
        return f"a compound of fields {list(dtype.names)} (dtype {dtype})"
    if dtype.kind == "c":
        return f"complex numbers (dtype {dtype})"
    return f"dtype {dtype}"


def _as_slice(columns: list[int]) -> slice | np.ndarray:
    """Contiguous columns as a slice (a view, no copy); otherwise an index array."""
    if columns == list(range(columns[0], columns[0] + len(columns))):
        return slice(columns[0], columns[0] + len(columns))
    return np.asarray(columns, dtype=np.intp)


def _is_prefix(mask: np.ndarray) -> bool:
    """True when every row's real slots come first (the usual FTAG layout)."""
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def class_weights(
    class_dict: Mapping | str | Path, input_type: str, label: str, num_classes: int
) -> list[float]:
    """Class weights for a label from class_dict, checked against the number of classes."""
    source = ""
    if not isinstance(class_dict, Mapping):
        source = f"{class_dict}: "
        class_dict = load_yaml_dict(class_dict, "class_dict")
    try:
        weights = class_dict[input_type][label]
    except (KeyError, TypeError):
        raise DataError(
            f"{source}class_dict has no weights for '{input_type}' label '{label}'; it has "
            f"{ {k: sorted(v) for k, v in class_dict.items() if isinstance(v, Mapping)} }."
        ) from None
    if len(weights) != num_classes:
        raise DataError(
            f"{source}class_dict['{input_type}']['{label}'] has {len(weights)} weights but the "
            f"task has {num_classes} classes."
        )
    return [float(w) for w in weights]

"""The predictions file: one row per test jet, in the test file's order, for the FTAG plot tools.

``<ckpt dir>/<checkpoint stem>__test_<sample><suffix>.h5`` holds

- ``jets`` (n_jets,): ``<model>_p<class>`` (float32) for every class of the jet classification
  task (``GN2_pb, GN2_pc, GN2_pu, GN2_ptau``; a class named as an ftag flavour gets that
  flavour's name, ``bjets`` -> ``GN2_pb``), ``<model>_<task>_p<class>`` for any other jet
  classification task and ``<model>_<target>`` (float32) for each target of a jet regression
  task, with ``<model>_<target>_stddev`` for a Gaussian one, as the old tool named them (a
  target two tasks regress is named after the task: `salt.models.tasks.regression_output_names`);
  then the task's truth label and the extra jet variables, copied unchanged (raw values and
  types, not label-mapped) from the test file's jets dataset: by default every variable it has
  (but one named like a prediction), else those of ``extra_jet_vars``. puma and
  atlas-ftag-tools read it as it is.
- ``tracks`` (n_jets, n_slots), with ``write_tracks`` or ``extra_track_vars``: the test file's
  slot layout; ``<model>_p<class>`` (float16) of the track classification tasks, as the old
  tool named them (the track origin task's ``GN2_pfromB``..., the track type task's
  ``GN2_pPion``...; a task whose names another track task already has gets
  ``<model>_<task>_p<class>``), ``<model>_VertexIndex`` (int16), ``<model>_<target>`` (and
  ``_stddev``) of the track regression tasks, the track tasks' truth labels and ``valid``,
  then the ``extra_track_vars``, copied slot by slot from the test file. Padded slots have
  probabilities 0, vertex index -1 and regression values NaN.
- the same for every other object type with tasks (``flows``, ``electrons``...), named as the
  test file's dataset, with ``write_tracks``.

Regression values are in the targets' own units: the task's scaling inverted, times the
target's denominator read (raw) from the test file; a Gaussian task's width σ goes through
the inverse scaling by its slope at the predicted mean (the delta method) and times
|denominator| (`RegressionTask.predict`).

With ``half_precision`` every predicted value is float16 (copied variables keep their type;
a regression value beyond float16's range, a pt above 65504 MeV, becomes inf: warned once);
the performance is computed from the values as written.

Predicted vertices are the connected components of the graph of real tracks joined where the
symmetrised same-vertex probability ``(p_ij + p_ji) / 2`` exceeds 0.5, numbered 0, 1, ... per
jet in the order of their first track.

Everything is written batch by batch, so memory stays bounded; `salt.evaluate` writes the file
under a temporary name and renames it into place with the performance and plots at the end
(`salt.utils.atomic.OutputSet`), so a failed evaluation leaves no partial file.

The file is written here with h5py, not with atlas-ftag-tools' ``H5Writer`` (which the old
tool used): ``H5Writer`` opens ``h5py.File(Path(dst), "w")`` itself, so it cannot take the file
object of `salt.utils.h5_output.H5Output` (``Path()`` refuses it), and on a full disk a file
it opened that way ends the process in a segmentation fault after "Exception ignored ...
Can't close file" tracebacks (checked with ftag 0.3.6 on a full tmpfs). Its layout is kept:
one row per jet in the test file's order (``H5Writer(shuffle=False)``), float16 outputs with
``half_precision`` (its ``precision="half"``), and lzf compression, which h5py reads without
hdf5plugin (``H5Writer`` defaults to lz4, which plain h5py cannot read).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor

import salt
from salt.data.ftag import DEFAULT_INPUT_MAP, VALID, DataError, dataset_of, not_numeric, open_h5
from salt.data.labels import LabelSpec, class_indices
from salt.errors import ConfigError
from salt.evaluation.run import LoadedRun
from salt.models.tasks import (
    ClassificationTask,
    RegressionTask,
    Task,
    VertexingTask,
    regression_output_names,
)
from salt.models.vertices import vertex_groups
from salt.utils.flavours import probability_name
from salt.utils.h5_output import H5Output
from salt.utils.names import closest_available

log = logging.getLogger("salt")

PROBABILITY_DTYPE = np.float32  # and regression outputs
HALF_DTYPE = np.float16  # every predicted value with half_precision
TRACK_PROBABILITY_DTYPE = np.float16  # (n_jets x n_slots x classes): half the size, ample precision
VERTEX_INDEX_DTYPE = np.int16
DENOMINATORS = "the regression tasks' target_denominators"


def sample_name(test_file: str | Path) -> str:
    """The sample of a test file: ``ttbar`` for FTAG names like ``pp_output_test_ttbar.h5``
    (what follows the last ``test_``), else the file's stem."""
    stem = Path(test_file).stem
    _, sep, rest = stem.rpartition("test_")
    return rest if sep and rest else stem


def predictions_path(ckpt_path: str | Path, test_file: str | Path, suffix: str = "") -> Path:
    """``<ckpt dir>/<ckpt stem>__test_<sample><suffix>.h5``; a suffix gets a leading ``_``."""
    suffix = str(suffix or "")
    if suffix and not suffix.startswith("_"):
        suffix = f"_{suffix}"
    ckpt_path = Path(ckpt_path)
    return ckpt_path.parent / f"{ckpt_path.stem}__test_{sample_name(test_file)}{suffix}.h5"


def class_field(model: str, class_name: str, task: str | None = None) -> str:
    """``GN2_pb`` (the main task of its kind) or ``GN2_<task>_pb``; a class named as an ftag
    flavour gets that flavour's name (``bjets`` -> ``pb``), the one puma looks for."""
    px = probability_name(class_name)
    return f"{model}_{px}" if task is None else f"{model}_{task}_{px}"


@dataclass
class JetScores:
    """The jet classification task's probabilities and truth classes, for the performance."""

    class_names: list[str]
    probs: np.ndarray  # [N, C] as the file holds them: float32 (float16 with half_precision)
    labels: np.ndarray  # [N] class index (the task's label_map applied); -1: no class


@dataclass
class _Field:
    """One output column: where its values come from."""

    name: str
    dtype: np.dtype
    task: Task | None = None  # a prediction of this task
    column: int | None = None  # the class column of a classification output
    source: str | None = None  # a variable copied from the test file


def _check_source(ds: h5py.Dataset, names: Sequence[str], key: str, path: Path) -> None:
    available = list(ds.dtype.names or ())
    for name in names:
        if name not in available:
            raise DataError(
                f"{path}: dataset '{ds.name.lstrip('/')}' has no variable '{name}' ({key})."
                f"{closest_available(name, available)}"
            )


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _unprefixed(model: str, tasks: Sequence[Task], first: Task | None) -> list[Task]:
    """The classification tasks whose classes get the old tool's ``<model>_p<class>``: ``first``,
    then each other one whose names no task before it took (object datasets)."""
    taken: set[str] = set()
    chosen = []
    classifications = [t for t in tasks if isinstance(t, ClassificationTask)]
    ordered = [first, *(t for t in classifications if t is not first)] if first else []
    for task in ordered:
        assert task is not None
        own = {class_field(model, c) for c in task.class_names or []}
        if not own & taken:
            chosen.append(task)
            taken |= own
    return chosen


def _prediction_fields(
    model: str, tasks: Sequence[Task], unprefixed: Sequence[Task], dtype: type, value_dtype: type
) -> list[_Field]:
    """The output columns of ``tasks``: class probabilities in ``dtype`` (``<model>_p<class>``
    for the ``unprefixed`` tasks, else ``<model>_<task>_p<class>``), regression values in
    ``value_dtype``, vertex indices."""
    fields: list[_Field] = []
    regression = regression_output_names(tasks)
    for task in tasks:
        if isinstance(task, ClassificationTask):
            prefix = None if any(task is t for t in unprefixed) else task.name
            for i, cls in enumerate(task.class_names or []):
                fields.append(_Field(class_field(model, cls, prefix), np.dtype(dtype), task, i))
        elif isinstance(task, RegressionTask):
            for i, name in enumerate(regression[task.name]):
                fields.append(_Field(f"{model}_{name}", np.dtype(value_dtype), task, i))
        elif isinstance(task, VertexingTask):
            fields.append(_Field(f"{model}_VertexIndex", np.dtype(VERTEX_INDEX_DTYPE), task))
    names = [f.name for f in fields]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(
            f"model {model}: two outputs would be named {twice[0]} in the predictions file "
            "(two classes of one task naming the same flavour, e.g. b and bjets?); rename one."
        )
    return fields


def _denominators(tasks: Sequence[Task]) -> list[str]:
    """The denominator variables the regression tasks among ``tasks`` read from the file."""
    return _unique(d for t in tasks if isinstance(t, RegressionTask) for d in t.denominators or [])


def _layout(
    fields: list[_Field], ds: h5py.Dataset, sources: Sequence[str], key: str, path: Path
) -> list[_Field]:
    _check_source(ds, sources, key, path)
    names = {f.name for f in fields}
    for src in sources:
        if src in names:
            raise ConfigError(
                f"{key}: variable '{src}' has the name of a prediction column; drop it."
            )
        fields.append(_Field(src, ds.dtype.fields[src][0], source=src))
    return fields


def _jet_sources(
    ds: h5py.Dataset, truth: Sequence[str], extra: Sequence[str] | None, predicted: set[str]
) -> list[str]:
    """The jet variables to copy: the truth labels, then ``extra`` (None: every variable of
    the file, but those named like a prediction: a test file may hold another training's)."""
    if extra is not None:
        return _unique([*truth, *extra])
    names = list(ds.dtype.names or ())
    skipped = [n for n in names if n in predicted]
    if skipped:
        log.warning(
            "salt: %s: not copying jet variables %s of dataset '%s': this run's predictions "
            "have their names",
            Path(ds.file.filename),
            ", ".join(skipped),
            ds.name.lstrip("/"),
        )
    return _unique([*truth, *(n for n in names if n not in predicted)])


def _truth(task: Task) -> list[str]:
    """The truth variables copied beside a track task's predictions: its label, or a regression
    task's targets."""
    return list(task.targets) if isinstance(task, RegressionTask) else [task.label]


def check_variables(
    test_file: Path,
    input_map: Mapping[str, str] | None,
    extra_jet_vars: Sequence[str] | None,
    extra_track_vars: Sequence[str],
) -> None:
    """Whether the test file has the variables asked for: a DataError naming the file, dataset
    and closest names before the model is loaded (`PredictionWriter` checks them again)."""
    imap = {**DEFAULT_INPUT_MAP, **dict(input_map or {})}
    with open_h5(test_file) as src:
        for input_type, names, key in (
            ("jets", extra_jet_vars or [], "extra_jet_vars"),
            ("tracks", extra_track_vars, "extra_track_vars"),
        ):
            if names:
                _check_source(_dataset(src, imap[input_type], test_file), names, key, test_file)


def _dataset(src: h5py.File, name: str, path: Path) -> h5py.Dataset:
    if name not in src:
        raise DataError(f"{path}: no dataset '{name}'; datasets: {sorted(src)}.")
    return src[name]


@dataclass
class _ObjectOutput:
    """The per-object outputs of one object type: read from ``src``, written to ``dataset``."""

    src: h5py.Dataset
    fields: list[_Field]
    dataset: h5py.Dataset


class PredictionWriter:
    """Writes the ``jets`` dataset (and one per object type with tasks: ``tracks``, ``flows``...)
    batch by batch, in the test file's order."""

    def __init__(
        self,
        run: LoadedRun,
        src: h5py.File,
        dst: h5py.File,
        num_jets: int,
        extra_jet_vars: Sequence[str] | None,
        write_tracks: bool,
        input_map: Mapping[str, str] | None,
        extra_track_vars: Sequence[str] = (),
        half_precision: bool = False,
    ) -> None:
        self.run, self.src, self.dst = run, src, dst
        self.path = Path(src.filename)
        imap = {**DEFAULT_INPUT_MAP, **dict(input_map or {})}
        tasks = list(run.tagger.tasks.values())
        self.jet_task = run.tagger.flavour_task()
        # the truth classes for the performance: the training's label mapping; a value the
        # model has no class for (e.g. taus for a b/c/light tagger) counts in no class (-1)
        self.jet_labels = (
            LabelSpec(self.jet_task.label_map, len(self.jet_task.class_names or []))
            if self.jet_task is not None
            else None
        )
        jet_tasks = [t for t in tasks if t.input_type == "jets"]
        truth = [t.label for t in jet_tasks if not isinstance(t, RegressionTask)]
        self.jets_src = _dataset(src, imap["jets"], self.path)
        _check_source(self.jets_src, _denominators(jet_tasks), DENOMINATORS, self.path)
        dtype = HALF_DTYPE if half_precision else PROBABILITY_DTYPE
        main = [self.jet_task] if self.jet_task is not None else []
        predicted = _prediction_fields(run.name, jet_tasks, main, dtype, dtype)
        self.jet_fields = _layout(
            predicted,
            self.jets_src,
            _jet_sources(self.jets_src, truth, extra_jet_vars, {f.name for f in predicted}),
            "extra_jet_vars",
            self.path,
        )
        # the scores for the performance as the file holds them: puma computes from those
        self.score_dtype = np.dtype(dtype)
        if self.jet_task is not None:  # its truth becomes class indices for the performance
            label = self.jet_task.label
            problem = not_numeric(self.jets_src.dtype.fields[label][0])
            if problem:
                raise DataError(
                    f"{self.path}: dataset '{imap['jets']}' variable '{label}' is stored as "
                    f"{problem}; expected integer labels for task {self.jet_task.name}."
                )
        self.jets = self._create("jets", self.jet_fields, (num_jets,), self.jets_src)
        # per-object outputs: a dataset per object type with tasks (tracks, flows, ...), named
        # as the test file's, in its slot layout; extra_track_vars writes the tracks' too
        self.objects: dict[str, _ObjectOutput] = {}
        if write_tracks or extra_track_vars:
            types = [t for t in run.tagger.object_types if any(k.input_type == t for k in tasks)]
            if extra_track_vars and "tracks" not in types:
                types.append("tracks")
            for input_type in types:
                extra = extra_track_vars if input_type == "tracks" else ()
                self.objects[input_type] = self._object_output(
                    input_type, tasks, imap, num_jets, extra, half_precision
                )
        self.num_jets = num_jets
        self._overflow_warned: set[str] = set()
        self.offset = 0
        self._probs: list[np.ndarray] = []
        self._truth: list[np.ndarray] = []

    def _object_output(
        self,
        input_type: str,
        tasks: Sequence[Task],
        imap: Mapping[str, str],
        num_jets: int,
        extra_vars: Sequence[str],
        half_precision: bool,
    ) -> _ObjectOutput:
        """The dataset of one object type's outputs, its truth and ``extra_vars``."""
        own = [t for t in tasks if t.input_type == input_type]
        # the first classification task is "the" one of its objects: <model>_p<class>
        first = next((t for t in own if isinstance(t, ClassificationTask)), None)
        name = dataset_of(imap, input_type)
        src = _dataset(self.src, name, self.path)
        if src.ndim != 2:
            raise DataError(
                f"{self.path}: dataset '{name}' has shape {src.shape}; the predictions' "
                f"{input_type} (write_tracks, extra_track_vars) need (n_jets, n_slots)."
            )
        _check_source(src, _denominators(own), DENOMINATORS, self.path)
        value_dtype = HALF_DTYPE if half_precision else PROBABILITY_DTYPE
        truth = _unique([*(v for t in own for v in _truth(t)), VALID])
        unprefixed = _unprefixed(self.run.name, own, first)
        fields = _layout(
            _prediction_fields(
                self.run.name, own, unprefixed, TRACK_PROBABILITY_DTYPE, value_dtype
            ),
            src,
            truth,
            f"write_tracks ({input_type} truth)",
            self.path,
        )
        fields = _layout(
            fields,
            src,
            [v for v in _unique(extra_vars) if v not in truth],
            "extra_track_vars",
            self.path,
        )
        shape = (num_jets, src.shape[1])
        return _ObjectOutput(src, fields, self._create(name, fields, shape, src))

    def _create(
        self, name: str, fields: list[_Field], shape: tuple[int, ...], like: h5py.Dataset
    ) -> h5py.Dataset:
        dtype = np.dtype([(f.name, f.dtype) for f in fields])
        rows = max(1, min(shape[0], 1000 if len(shape) == 1 else 100))
        ds = self.dst.create_dataset(
            name, shape=shape, dtype=dtype, chunks=(rows, *shape[1:]), compression="lzf"
        )
        for key, value in like.attrs.items():  # e.g. the class names of flavour_label
            ds.attrs[key] = value
        return ds

    def write(self, outputs: Mapping[str, Tensor], pad_masks: Mapping[str, Tensor]) -> None:
        """Write the next batch of model outputs (raw, as the tagger returns them)."""
        probs = self.run.tagger.predict(outputs)
        n = len(next(iter(probs.values())))
        rows = slice(self.offset, self.offset + n)
        if rows.stop > self.num_jets:
            raise RuntimeError(f"more jets predicted than the {self.num_jets} expected")
        probs = {**probs, **self._regression_values(outputs, rows)}
        self.jets[rows] = self._rows(self.jet_fields, self.jets_src, rows, probs, None)
        for input_type, obj in self.objects.items():
            pad_mask = pad_masks[input_type]
            if pad_mask.shape[1] != obj.dataset.shape[1]:
                raise RuntimeError(
                    f"{input_type} slots of the batch ({pad_mask.shape[1]}) differ from the "
                    f"file's ({obj.dataset.shape[1]}): evaluate with trim_tracks=False"
                )
            obj.dataset[rows] = self._rows(obj.fields, obj.src, rows, probs, pad_mask)
        if self.jet_task is not None:
            scores = probs[self.jet_task.name].float().cpu().numpy()
            self._probs.append(scores.astype(self.score_dtype))
            assert self.jet_labels is not None
            raw = self.jets_src.fields(self.jet_task.label)[rows]
            self._truth.append(class_indices(raw, self.jet_labels)[0])
        self.offset += n

    def _regression_values(self, outputs: Mapping[str, Tensor], rows: slice) -> dict[str, Tensor]:
        """The regression tasks' values in the targets' units: times their denominators, read
        raw from the test file's dataset of the task's objects (jets or tracks)."""
        values = {}
        sources = {"jets": self.jets_src, **{t: o.src for t, o in self.objects.items()}}
        for name, task in self.run.tagger.tasks.items():
            if not isinstance(task, RegressionTask) or task.input_type not in sources:
                continue
            denominators = None
            if task.denominators is not None:
                src = sources[task.input_type]
                raw = src.fields(task.denominators)[rows]
                columns = [raw[d].astype(np.float32) for d in task.denominators]
                denominators = torch.from_numpy(np.stack(columns, axis=-1))
                denominators = denominators.to(outputs[name].device)
            values[name] = task.predict(outputs[name], denominators)
        return values

    def _rows(
        self,
        fields: list[_Field],
        src: h5py.Dataset,
        rows: slice,
        probs: Mapping[str, Tensor],
        pad_mask: Tensor | None,
    ) -> np.ndarray:
        n = rows.stop - rows.start
        shape = (n,) if pad_mask is None else tuple(pad_mask.shape)
        out = np.zeros(shape, dtype=np.dtype([(f.name, f.dtype) for f in fields]))
        sources = [f.source for f in fields if f.source is not None]
        copied = src.fields(sources)[rows] if sources else None
        cache: dict[str, np.ndarray] = {}
        padded = None if pad_mask is None else pad_mask.cpu().numpy()
        for f in fields:
            if f.source is not None:
                assert copied is not None
                out[f.name] = copied[f.source]
                continue
            assert f.task is not None
            if f.task.name not in cache:
                cache[f.task.name] = self._task_values(f.task, probs[f.task.name], pad_mask)
            values = cache[f.task.name]
            value = values[..., f.column] if f.column is not None else values
            if padded is not None and not isinstance(f.task, VertexingTask):
                value = np.where(padded, np.nan if isinstance(f.task, RegressionTask) else 0, value)
            if isinstance(f.task, RegressionTask):
                self._warn_overflow(f, value)
            with np.errstate(over="ignore"):  # warned once above, not per batch
                out[f.name] = value
        return out

    def _warn_overflow(self, f: _Field, value: np.ndarray) -> None:
        """Once per column: finite regression values its (float16) type turns into inf."""
        limit = np.finfo(f.dtype).max
        if f.name in self._overflow_warned or not (np.abs(value[np.isfinite(value)]) > limit).any():
            return
        self._overflow_warned.add(f.name)
        log.warning(
            "salt: %s: predicted values beyond %s's range (%g) are written as inf with "
            "half_precision; evaluate with half_precision=false for this output",
            f.name,
            f.dtype,
            limit,
        )

    @staticmethod
    def _task_values(task: Task, value: Tensor, pad_mask: Tensor | None) -> np.ndarray:
        if isinstance(task, VertexingTask):
            assert pad_mask is not None
            return vertex_groups(value, pad_mask).cpu().numpy()
        return value.float().cpu().numpy()

    def finish(self) -> JetScores | None:
        """Check that every jet was written; the jet task's scores for the performance."""
        if self.offset != self.num_jets:
            raise RuntimeError(f"{self.offset} jets predicted, {self.num_jets} expected")
        if self.jet_task is None:
            return None
        return JetScores(
            list(self.jet_task.class_names or []),
            np.concatenate(self._probs) if self._probs else np.zeros((0, 0), self.score_dtype),
            np.concatenate(self._truth) if self._truth else np.zeros(0, np.int64),
        )


@torch.no_grad()
def write_predictions(
    run: LoadedRun,
    batches: Iterable[Mapping[str, Any]],
    test_file: Path,
    out_path: Path,
    num_jets: int,
    *,
    extra_jet_vars: Sequence[str] | None = (),
    write_tracks: bool = False,
    input_map: Mapping[str, str] | None = None,
    extra_track_vars: Sequence[str] = (),
    half_precision: bool = False,
    show_progress: bool = False,
) -> JetScores | None:
    """Predict every batch (in the test file's order) and write them to ``out_path`` (the
    caller's temporary name: see the module docstring).

    ``batches`` must cover jets ``0..num_jets`` of ``test_file`` in order; with
    ``write_tracks`` or ``extra_track_vars`` they must keep the file's track slots
    (``trim_tracks=False``). ``extra_jet_vars=None`` copies every jet variable of the file. A
    failed write (full disk) raises OSError naming ``out_path`` after the batch it happened in.
    """
    with open_h5(test_file) as src, H5Output(out_path) as out:
        dst = out.file
        dst.attrs["salt_version"] = salt.__version__
        dst.attrs["tagger"] = run.name
        dst.attrs["checkpoint"] = str(run.ckpt_path)
        dst.attrs["test_file"] = str(test_file)
        # built first: it checks the requested variables before any work is done
        writer = PredictionWriter(
            run,
            src,
            dst,
            num_jets,
            extra_jet_vars,
            write_tracks,
            input_map,
            extra_track_vars,
            half_precision,
        )
        with progress_bar(num_jets, show_progress) as bar:
            for batch in batches:
                inputs = {k: v.to(run.device) for k, v in batch["inputs"].items()}
                masks = {k: v.to(run.device) for k, v in batch["pad_masks"].items()}
                outputs, _ = run.tagger(inputs, masks)
                writer.write(outputs, masks)
                out.check()  # a full disk stops the evaluation now, not after every batch
                if bar is not None:
                    bar.update(len(next(iter(inputs.values()))))
        scores = writer.finish()
    return scores


def progress_bar(total: int, enabled: bool) -> Any:
    """A context giving a tqdm bar counting jets, or None when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    from tqdm import tqdm

    return tqdm(total=total, desc="predicting", unit="jet", dynamic_ncols=True, mininterval=1.0)

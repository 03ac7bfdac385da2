"""TensorBoard logging (``logger=tensorboard``): event files in ``run_dir/tensorboard/``.

``tensorboard --logdir <log_dir>`` shows every run directory as a run: each metric as a scalar
under its own name (``train/loss``, ``train/lr``, ``train/grad_norm``, ``val/jet_accuracy``,
...), each validation's jet confusion matrix as an image (``val/confusion_matrix``), and, on a
fresh start, the config and the run's metadata as text. torch's own ``SummaryWriter`` writes
the files; the ``tensorboard`` package it needs is a salt dependency.

Resume: :meth:`TensorBoardLogger.state_dict` (in every checkpoint) holds the event directory
and the last step logged before the checkpoint. A resumed run, in a new run directory or in
the same one (a requeued Slurm job), starts from a copy of those event files without the
events logged after that step, which it logs again; its writer starts with TensorBoard's
``purge_step`` marker too, so a viewer that read the old files while they were being written
drops those steps as well. Each step appears once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from salt.tracking.base import Logger
from salt.tracking.confusion import checked_counts
from salt.utils.atomic import atomic_path, yaml_text

LOGGER = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
EVENT_FILES = "events.out.tfevents.*"
CONFUSION_TAG = "val/confusion_matrix"


def _markdown_yaml(obj: Any, name: str) -> str:
    """``obj`` as a YAML code block (TensorBoard renders text as markdown)."""
    try:
        text = yaml_text(obj, name)
    except TypeError:  # a value YAML cannot write plainly: JSON, with it as text
        text = json.dumps(obj, indent=2, default=str)
    return "\n".join("    " + line for line in text.splitlines())


def copy_events(source: Path, dest: Path, last_step: int) -> int:
    """Copy the event files of ``source`` to ``dest`` (the same directory: rewritten in place)
    keeping only the events up to ``last_step``; returns the number of files copied.

    A file cut short by a killed writer is read up to its last complete record.
    """
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    dest.mkdir(parents=True, exist_ok=True)
    files = sorted(source.glob(EVENT_FILES))
    for path in files:
        kept = []
        for record in RawEventFileLoader(str(path)).Load():
            event = event_pb2.Event.FromString(record)
            # the file's version header has no step of its own: every file keeps it
            if event.step <= last_step or event.WhichOneof("what") == "file_version":
                kept.append(record)
        # temp then rename: the source may be this very file (a requeued job's directory)
        with atomic_path(dest / path.name) as tmp, tmp.open("wb") as fh:
            writer = RecordWriter(fh)
            for record in kept:
                writer.write(record)
    return len(files)


class TensorBoardLogger(Logger):
    """Event files in ``run_dir/tensorboard``; rank 0 only (the factory's caller guarantees it)."""

    def __init__(self, run_dir: Path, *, resume_state: Mapping[str, Any] | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(run_dir) / TENSORBOARD_DIR
        state = resume_state or {}
        source, last_step = state.get("tensorboard_dir"), state.get("tensorboard_step")
        self.fresh = source is None or last_step is None
        # the config and metadata go in at step 0, before the first training step (step 1)
        self._last_step = 0 if self.fresh else int(last_step)
        purge_step = None
        if not self.fresh:
            self._continue(Path(source))
            purge_step = self._last_step + 1
        self.writer: Any = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)
        self._closed = False

    def _continue(self, source: Path) -> None:
        """The previous run's events up to the checkpoint, copied into this run's directory."""
        if not source.is_dir():
            # Losing the earlier curves must not stop a resumed multi-day training.
            LOGGER.warning(
                "resume_state['tensorboard_dir'] = %s does not exist: the TensorBoard history "
                "starts at step %d in %s",
                source,
                self._last_step + 1,
                self.log_dir,
            )
            return
        copy_events(source, self.log_dir, self._last_step)

    def _step(self, step: int) -> int:
        self._last_step = max(self._last_step, int(step))
        return int(step)

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        if self.fresh:  # a resumed run's history has them (a second copy would be noise)
            self.writer.add_text("config", _markdown_yaml(dict(params), "config"), 0)

    def log_metadata(self, meta: Mapping[str, Any]) -> None:
        if self.fresh:
            self.writer.add_text("metadata", _markdown_yaml(dict(meta), "metadata"), 0)

    def log_metrics(
        self, metrics: Mapping[str, float], step: int, epoch: int | None = None
    ) -> None:
        step = self._step(step)
        for name, value in metrics.items():
            # NaN and infinity are written as they are: TensorBoard leaves them out of a chart
            self.writer.add_scalar(name, float(value), step)
        self.writer.flush()  # in the OS's hands, as the local metrics file's rows

    def log_confusion_matrix(
        self,
        counts: Sequence[Sequence[int]],
        class_names: Sequence[str],
        step: int,
        epoch: int | None = None,
    ) -> None:
        from salt.tracking.plots import confusion_figure, figure_rgb

        counts = checked_counts(counts, class_names)
        try:
            image = figure_rgb(confusion_figure(counts, class_names, step, epoch))
        except Exception:
            # A plotting problem must not end a long training; the local JSON has the numbers.
            LOGGER.warning("could not draw the confusion matrix for TensorBoard", exc_info=True)
            return
        self.writer.add_image(CONFUSION_TAG, image, self._step(step), dataformats="HWC")
        self.writer.flush()

    def on_epoch_end(self, epoch: int) -> None:
        self.writer.flush()

    def state_dict(self) -> dict[str, Any]:
        # Called for every checkpoint: what was logged before it is on disk when it is saved,
        # so a kill right after the checkpoint loses none of it.
        if not self._closed:
            self.writer.flush()
        return {"tensorboard_dir": str(self.log_dir.resolve()), "tensorboard_step": self._last_step}

    def finalize(self, status: str = "success") -> None:
        if self._closed:
            return
        self._closed = True
        self.writer.close()

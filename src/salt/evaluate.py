r"""``python -m salt.evaluate``: predictions file and b-tagging performance of a trained run.

Examples::

    python -m salt.evaluate run_dir=logs/GN2_20260101-120000          # the run's test file
    python -m salt.evaluate run_dir=logs/<run> data.test_file=/data/pp_output_test_ttbar.h5 \
        data.num_test=100000 data.test_suffix=v2 write_tracks=true
    python -m salt.evaluate run_dir=logs/<run> ckpt_path=logs/<run>/ckpts/last.ckpt

Writes, beside the checkpoint (``logs/<run>/ckpts/``): ``<ckpt stem>__test_<sample><suffix>.h5``
(see `salt.evaluation.predictions`), ``...__performance.yaml``, ``...__roc.png`` and
``...__disc.png`` (see `salt.evaluation.performance`). Runs on one device.

The files are written under temporary names and renamed into place together at the end:
a failed evaluation (full disk, no permission, an error, Ctrl-C) leaves no new file and an
earlier evaluation's files as they were; the same command runs again.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from salt.config_check import command
from salt.data.build import DataConfig, make_loader
from salt.data.dataset import Batch
from salt.errors import RERUN_ADVICE, ConfigError, Interrupted
from salt.evaluation.performance import (
    Performance,
    b_tagging_performance,
    check_tau_fraction,
    format_table,
    plot_discriminant,
    plot_roc,
    write_performance,
)
from salt.evaluation.predictions import check_variables, predictions_path, write_predictions
from salt.evaluation.run import (
    LoadedRun,
    choose_checkpoint,
    load_run,
    resolve_test_file,
    run_config,
)
from salt.evaluation.settings import EvaluateConfig
from salt.signals import ALWAYS, IF_DEFAULT, Catch, lost_interrupts_quiet
from salt.utils import typed_config
from salt.utils.atomic import OutputSet

# where else a read-only checkpoint directory lets an evaluation write its outputs
ELSEWHERE = (
    "copy the checkpoint to a writable directory and pass ckpt_path=<copy> (the outputs are "
    "written beside the checkpoint)"
)


@dataclass
class EvaluationResult:
    predictions: Path
    num_jets: int
    performance: Performance | None = None
    performance_file: Path | None = None
    roc_file: Path | None = None
    disc_file: Path | None = None


def output_paths(predictions: Path) -> tuple[Path, Path, Path, Path]:
    """The predictions file, its performance YAML, its ROC plot and its discriminant plot."""
    stem = predictions.stem
    return (
        predictions,
        predictions.with_name(f"{stem}__performance.yaml"),
        predictions.with_name(f"{stem}__roc.png"),
        predictions.with_name(f"{stem}__disc.png"),
    )


def refuse_overwrite(paths: tuple[Path, ...], overwrite: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"{existing[0]} exists; pass overwrite=true to replace it, or data.test_suffix=... "
            "to write beside it."
        )


def evaluation_data_config(run: LoadedRun, cfg: EvaluateConfig) -> DataConfig:
    """The run's data config with this evaluation's settings on top."""
    data = run.data_config()
    if cfg.data.batch_size is not None:
        data.batch_size = cfg.data.batch_size
    # One process reads in file order: the rows of the output follow the test file.
    data.num_workers = 0
    if cfg.tracks:
        data.trim_tracks = False  # keep the file's track slots, so outputs align with them
    return data


def evaluate(config: EvaluateConfig | DictConfig) -> EvaluationResult:
    """Write the predictions file and the performance of ``cfg.run_dir``'s checkpoint."""
    cfg = typed_config.read(EvaluateConfig, config, "")
    # Ctrl-C and Slurm's cancel (SIGTERM) stop it at the next batch (a second Ctrl-C at once):
    # a KeyboardInterrupt raised anywhere can land in a callback that ignores it (1 in 8 did,
    # in h5py's weakrefs), and SIGTERM's default action would leave the temporary predictions
    # file, as large as the file itself
    signals = Catch({"SIGINT": ALWAYS, "SIGTERM": IF_DEFAULT}, interrupt_twice=True)
    with signals as stopped, lost_interrupts_quiet():
        try:
            return _evaluate(cfg, stopped)
        except KeyboardInterrupt:
            if cfg.debug:
                raise
            signum = stopped.first or signal.SIGINT
            how = "interrupted"
            if signum != signal.SIGINT:
                how = f"stopped by signal {signum} ({signal.Signals(signum).name})"
            # the outputs are written together or not at all
            kept = "no output was written (earlier results unchanged): run the evaluation again"
            raise Interrupted(signum, f"{how}; {kept}") from None


def _until_stopped(batches: Iterable[Batch], stopped: Catch) -> Iterator[Batch]:
    """``batches`` until a signal is caught (then KeyboardInterrupt: the outputs being written
    are dropped, OutputSet). Raised here, between batches, not from the signal handler: an
    exception raised there can land in a callback that ignores it (a weakref's)."""
    for batch in batches:
        if stopped.first is not None:
            raise KeyboardInterrupt
        yield batch


def _evaluate(cfg: EvaluateConfig, stopped: Catch) -> EvaluationResult:
    f_c, f_tau, working_points, num_test = cfg.f_c, cfg.f_tau, cfg.working_points, cfg.data.num_test
    run_dir = Path(str(cfg.run_dir))
    # outputs are named and checked before the model is loaded: a refusal comes at once
    run_data = run_config(run_dir).data
    ckpt_path = choose_checkpoint(run_dir, cfg.ckpt_path)
    test_file = resolve_test_file(run_data, cfg.data.test_file)
    paths = output_paths(predictions_path(ckpt_path, test_file, cfg.data.test_suffix))
    refuse_overwrite(paths, cfg.overwrite)
    OutputSet(ELSEWHERE).check_writable(paths[0])  # before the long part
    check_variables(test_file, run_data.input_map, cfg.extra_jet_vars, cfg.extra_track_vars)
    run = load_run(run_dir, ckpt_path, cfg.device)
    jet_task = run.tagger.flavour_task()
    if jet_task is not None:  # a tau fraction without a tau class: before the long part
        check_tau_fraction(list(jet_task.class_names or []), f_tau)

    data = evaluation_data_config(run, cfg)
    loader = make_loader(
        data,
        [test_file],
        run.norm_dict,
        variables=run.variables,
        labels={},  # truth is copied from the file as it is, without the training label_map
        num_jets=num_test,
        num_jets_key="data.num_test",
        train=False,
        seed=run.cfg.seed,
        num_workers=0,
        pin_memory=run.device.type == "cuda",
    )
    num_jets = loader.dataset.num_jets
    print(f"salt: evaluating {run.ckpt_path} on {num_jets} jets of {test_file}", flush=True)
    with OutputSet(ELSEWHERE) as outputs:
        with outputs.file(paths[0]) as tmp:
            scores = write_predictions(
                run,
                _until_stopped(loader, stopped),
                test_file,
                tmp,
                num_jets,
                extra_jet_vars=cfg.extra_jet_vars,
                write_tracks=cfg.write_tracks,
                input_map=dict(data.input_map),
                extra_track_vars=cfg.extra_track_vars,
                half_precision=cfg.half_precision,
                show_progress=cfg.progress_bar,
            )
        result = EvaluationResult(paths[0], num_jets)
        try:
            if scores is None:
                raise ValueError("the model has no jet classification task")
            perf = b_tagging_performance(scores, f_c, working_points, f_tau)
        except ValueError as err:
            print(f"salt: no b-tagging performance: {err}", flush=True)
            # an earlier evaluation's (overwrite=true) performance is not this one's
            outputs.commit(remove=paths[1:])
            print(f"salt: predictions written to {paths[0]}", flush=True)
            return result
        title = f"{run.name}: {run.ckpt_path.name} on {test_file.name}"
        print(format_table(perf, title), flush=True)
        with outputs.file(paths[1]) as tmp:
            write_performance(
                perf,
                tmp,
                {
                    "tagger": run.name,
                    "checkpoint": str(run.ckpt_path),
                    "test_file": str(test_file),
                    "predictions": str(paths[0]),
                },
            )
        fractions = f"$f_c$ = {f_c:g}" + (f", $f_\\tau$ = {f_tau:g}" if f_tau else "")
        plot_title = f"{run.name} on {test_file.name}, {fractions}"
        with outputs.file(paths[2]) as tmp:
            plot_roc(perf, tmp, title=plot_title)
        with outputs.file(paths[3]) as tmp:
            plot_discriminant(perf, tmp, title=plot_title)
        if stopped.first is not None:
            raise KeyboardInterrupt  # as between batches
        outputs.commit()
    print(f"salt: predictions written to {paths[0]}", flush=True)
    print(f"salt: performance written to {paths[1]}, {paths[2]} and {paths[3]}", flush=True)
    result.performance, result.performance_file = perf, paths[1]
    result.roc_file, result.disc_file = paths[2], paths[3]
    return result


main = command("evaluate", evaluate, disk_full_advice=RERUN_ADVICE)

if __name__ == "__main__":
    main()

r"""``python -m salt.evaluate``: predictions file and b-tagging performance of a trained run.

Examples::

    python -m salt.evaluate run_dir=logs/GN2_20260101-120000          # the run's test file
    python -m salt.evaluate run_dir=logs/<run> data.test_file=/data/pp_output_test_ttbar.h5 \
        data.num_test=100000 data.test_suffix=v2 write_tracks=true
    python -m salt.evaluate run_dir=logs/<run> ckpt_path=logs/<run>/ckpts/last.ckpt

Writes, beside the checkpoint (``logs/<run>/ckpts/``): ``<ckpt stem>__test_<sample><suffix>.h5``
(see `salt.evaluation.predictions`), ``...__performance.yaml`` and ``...__roc.png`` (see
`salt.evaluation.performance`). Runs on one device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from salt.config_check import command
from salt.data.build import make_loader
from salt.errors import ConfigError
from salt.evaluation.performance import (
    Performance,
    b_tagging_performance,
    check_settings,
    format_table,
    plot_roc,
    write_performance,
)
from salt.evaluation.predictions import predictions_path, write_predictions
from salt.evaluation.run import (
    LoadedRun,
    choose_checkpoint,
    load_run,
    resolve_test_file,
    run_config,
    run_data_config,
    run_dir_of,
)


@dataclass
class EvaluationResult:
    predictions: Path
    num_jets: int
    performance: Performance | None = None
    performance_file: Path | None = None
    roc_file: Path | None = None


def output_paths(predictions: Path) -> tuple[Path, Path, Path]:
    """The predictions file, its performance YAML and its ROC plot."""
    stem = predictions.stem
    return (
        predictions,
        predictions.with_name(f"{stem}__performance.yaml"),
        predictions.with_name(f"{stem}__roc.png"),
    )


def refuse_overwrite(paths: tuple[Path, ...], overwrite: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"{existing[0]} exists; pass overwrite=true to replace it, or data.test_suffix=... "
            "to write beside it."
        )


def evaluation_data_config(run: LoadedRun, cfg: DictConfig) -> dict[str, Any]:
    """The run's data config with this evaluation's settings on top."""
    data = run.data_config()
    batch_size = cfg.data.get("batch_size")
    if batch_size is not None:
        if int(batch_size) < 1:
            raise ConfigError(f"data.batch_size={batch_size}: must be >= 1.")
        data["batch_size"] = int(batch_size)
    # One process reads in file order: the rows of the output follow the test file.
    data["num_workers"] = 0
    if cfg.get("write_tracks"):
        data["trim_tracks"] = False  # keep the file's track slots, so outputs align with them
    return data


def evaluate(cfg: DictConfig) -> EvaluationResult:
    """Write the predictions file and the performance of ``cfg.run_dir``'s checkpoint."""
    f_c = float(cfg.get("f_c", 0.2))
    working_points = [float(w) for w in cfg.get("working_points") or []]
    check_settings(f_c, working_points)
    num_test = int(cfg.data.get("num_test", -1))
    if num_test == 0 or num_test < -1:
        raise ConfigError(f"data.num_test={num_test}: use -1 (all jets) or a positive number.")
    run_dir = run_dir_of(cfg)
    # outputs are named and checked before the model is loaded: a refusal comes at once
    run_data = run_data_config(run_config(run_dir), run_dir)
    ckpt_path = choose_checkpoint(run_dir, cfg.get("ckpt_path"))
    test_file = resolve_test_file(run_data, cfg.data.get("test_file"))
    paths = output_paths(predictions_path(ckpt_path, test_file, cfg.data.get("test_suffix")))
    refuse_overwrite(paths, bool(cfg.get("overwrite")))
    run = load_run(run_dir, ckpt_path, cfg.get("device", "auto"))

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
        seed=int(run.cfg.get("seed", 42)),
        num_workers=0,
        pin_memory=run.device.type == "cuda",
    )
    num_jets = loader.dataset.num_jets
    print(f"salt: evaluating {run.ckpt_path} on {num_jets} jets of {test_file}", flush=True)
    scores = write_predictions(
        run,
        loader,
        test_file,
        paths[0],
        num_jets,
        extra_jet_vars=list(cfg.get("extra_jet_vars") or []),
        write_tracks=bool(cfg.get("write_tracks")),
        input_map=data.get("input_map"),
        show_progress=bool(cfg.get("progress_bar", True)),
    )
    print(f"salt: predictions written to {paths[0]}", flush=True)
    result = EvaluationResult(paths[0], num_jets)
    try:
        if scores is None:
            raise ValueError("the model has no jet classification task")
        perf = b_tagging_performance(scores, f_c, working_points)
    except ValueError as err:
        print(f"salt: no b-tagging performance: {err}", flush=True)
        for stale in paths[1:]:  # from an earlier evaluation (overwrite=true): not this one's
            stale.unlink(missing_ok=True)
        return result
    title = f"{run.name}: {run.ckpt_path.name} on {test_file.name}"
    print(format_table(perf, title), flush=True)
    write_performance(
        perf,
        paths[1],
        {
            "tagger": run.name,
            "checkpoint": str(run.ckpt_path),
            "test_file": str(test_file),
            "predictions": str(paths[0]),
        },
    )
    plot_roc(perf, paths[2], title=f"{run.name} on {test_file.name}, f_c = {f_c:g}")
    print(f"salt: performance written to {paths[1]} and {paths[2]}", flush=True)
    result.performance, result.performance_file, result.roc_file = perf, paths[1], paths[2]
    return result


main = command("evaluate", evaluate)

if __name__ == "__main__":
    main()

"""Side by side: this package's GN2 and the old tool's (salt-ml 0.13.0) on the same jets.

    python scripts/compare_with_salt.py                  # built-in sample, both tools (~25 min)
    python scripts/compare_with_salt.py --data DIR       # FTAG files in DIR (see --help)
    python scripts/compare_with_salt.py --only ours --variant registers0 -- \
        model.encoder.num_registers=0                    # a variant of ours beside the old tool
    python scripts/compare_with_salt.py --equivalence    # same weights -> same function?
    python scripts/compare_with_salt.py --speed          # real GN2, fp32 CPU jets/s of both

Both tools train the same small GN2 (embedding 128, init net [128], 2 encoder layers, 4 heads,
output 64, heads [128, 64, 32], ReLU, no dropout, class weights from the class dict, the old
tool's 19 track variables plus jet pt/eta) with the same one-cycle schedule, batch size, epochs
and no gradient clipping, on CPU in fp32. Each is evaluated on the test file by its own
evaluation command (each picks the epoch with the lowest validation jet-classification loss),
and both predictions files are scored here with the same D_b = ln(p_b / (f_c p_c + (1-f_c) p_u)).
Beside them: simple cut-based baselines on the test file's tracks (the n-th highest signed d0
significance, the number of tracks above a significance), which any tagger must beat.

The old tool lives in its own virtualenv (``--venv``, created on first use): its wheel pins
torch 2.12 and onnxruntime 1.25, so it is installed with ``--no-deps`` and its dependencies
with torch 2.13.0; ``hdf5plugin`` reads its LZ4-compressed predictions. Everything is written
under ``--work``; a tool whose predictions file is already there is not trained again
(``--retrain`` forces it). This is a tool for developers, not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
OLD_VERSION = "0.13.0"
# The old wheel's requirements, less its torch and onnxruntime pins (torch 2.13.0 is the one
# this machine has as a wheel); hdf5plugin to read its LZ4-compressed predictions.
OLD_DEPENDENCIES = [
    "torch==2.13.0",
    "atlas-ftag-tools==0.3.3",
    "comet_ml>=3.49.7",
    "filelock>=3.12",
    "h5py>=3.14.0",
    "jsonargparse[argcomplete,signatures]>=4.32.0",
    "lightning==2.6.1",
    "lion-pytorch>=0.2.2",
    "numpy>=2.2.6",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "puma-hep==0.5.3",
    "rich>=14.1.0",
    "scipy>=1.15.3",
    "torchmetrics==1.8.2",
    "tqdm>=4.66.1",
    "umami-preprocessing==0.3.1",
    "hdf5plugin",
]
# GN2's variables: conf/model/GN2.yaml holds the old tool's list (its GN2.yaml), 19 track
# variables and jet pt/eta; both tools train on exactly these
_GN2_VARIABLES = yaml.safe_load((REPO / "conf" / "model" / "GN2.yaml").read_text())["variables"]
JET_VARIABLES: list[str] = _GN2_VARIABLES["jets"]
TRACK_VARIABLES: list[str] = _GN2_VARIABLES["tracks"]
WORKING_POINTS = (60, 70, 77, 85)
SIGNIFICANCE = "IP3D_signed_d0_significance"


@dataclass(frozen=True)
class Model:
    """The GN2 sizes both tools train."""

    embed_dim: int = 128
    init_hidden: int = 128
    num_layers: int = 2
    num_heads: int = 4
    out_dim: int = 64
    head_hidden: tuple[int, ...] = (128, 64, 32)
    activation: str = "ReLU"


@dataclass(frozen=True)
class Schedule:
    epochs: int
    batch_size: int
    initial: float = 1e-7
    max: float = 5e-4
    end: float = 1e-5
    pct_start: float = 0.01
    weight_decay: float = 1e-5


@dataclass(frozen=True)
class Files:
    train: Path
    val: Path
    test: Path
    norm_dict: Path
    class_dict: Path


# ---- the two tools ----------------------------------------------------------------------------
def ours_overrides(m: Model, s: Schedule, f: Files, name: str, log_dir: Path) -> list[str]:
    """`python -m salt.train` arguments: model=GN2 at the comparison's sizes, nothing else."""
    heads = f"[{','.join(str(n) for n in m.head_hidden)}]"
    args = [
        "model=GN2",
        "data=ftag",
        f"data.train_file={f.train}",
        f"data.val_file={f.val}",
        f"data.test_file={f.test}",
        f"data.norm_dict={f.norm_dict}",
        f"data.class_dict={f.class_dict}",
        f"data.batch_size={s.batch_size}",
        f"trainer.max_epochs={s.epochs}",
        "trainer.gradient_clip_val=null",
        "trainer.precision=32",
        "trainer.accelerator=cpu",
        "trainer.progress_bar=false",
        f"optimizer.initial={s.initial}",
        f"optimizer.max={s.max}",
        f"optimizer.end={s.end}",
        f"optimizer.pct_start={s.pct_start}",
        f"optimizer.weight_decay={s.weight_decay}",
        "force=true",
        f"log_dir={log_dir}",
        f"name={name}",
        f"model.name={name}",
        f"model.variables.jets=[{','.join(JET_VARIABLES)}]",
        f"model.variables.tracks=[{','.join(TRACK_VARIABLES)}]",
        f"model.embed_dim={m.embed_dim}",
        f"model.init_net.hidden_layers=[{m.init_hidden}]",
        f"model.init_net.activation={m.activation}",
        f"model.encoder.num_layers={m.num_layers}",
        f"model.encoder.out_dim={m.out_dim}",
        f"model.encoder.activation={m.activation}",
        "model.encoder.dropout=0.0",
        f"model.attention.num_heads={m.num_heads}",
        "model.attention.head_dim=null",
    ]
    for task in ("jet_classification", "track_origin", "track_vertexing"):
        args += [
            f"model.tasks.{task}.hidden_layers={heads}",
            f"model.tasks.{task}.activation={m.activation}",
            f"model.tasks.{task}.dropout=0.0",
        ]
    return args


def old_config(m: Model, s: Schedule, f: Files, name: str, log_dir: Path) -> dict:
    """The old tool's config for the same model: its GN2 config (salt/configs/GN2/GN2.yaml)
    with the comparison's sizes, CPU fp32, no logger, no gradient clipping."""
    dense = {"hidden_layers": list(m.head_hidden), "activation": m.activation}

    def task(name: str, input_name: str, label: str, loss: dict, **extra) -> dict:
        return {
            "class_path": f"salt.models.{extra.pop('kind')}",
            "init_args": {
                "name": name,
                "input_name": input_name,
                "label": label,
                "loss": loss,
                **extra,
            },
        }

    return {
        "name": name,
        "model": {
            "lrs_config": {
                "initial": s.initial,
                "max": s.max,
                "end": s.end,
                "pct_start": s.pct_start,
                "weight_decay": s.weight_decay,
            },
            "model": {
                "class_path": "salt.models.SaltModel",
                "init_args": {
                    "init_nets": [
                        {
                            "input_name": "tracks",
                            "dense_config": {
                                "output_size": m.embed_dim,
                                "hidden_layers": [m.init_hidden],
                                "activation": m.activation,
                            },
                        }
                    ],
                    "encoder": {
                        "class_path": "salt.models.Transformer",
                        "init_args": {
                            "num_layers": m.num_layers,
                            "embed_dim": m.embed_dim,
                            "out_dim": m.out_dim,
                            # flash-varlen (GN2.yaml) needs a GPU; torch-math is its fallback
                            "attn_type": "torch-math",
                            "norm": "LayerNorm",
                            "do_final_norm": True,
                            "dense_kwargs": {"activation": m.activation, "gated": False},
                            "attn_kwargs": {"num_heads": m.num_heads},
                        },
                    },
                    "pool_net": {
                        "class_path": "salt.models.GlobalAttentionPooling",
                        "init_args": {"input_size": m.out_dim},
                    },
                    "tasks": {
                        "class_path": "torch.nn.ModuleList",
                        "init_args": {
                            "modules": [
                                task(
                                    "jets_classification",
                                    "jets",
                                    "flavour_label",
                                    {"class_path": "torch.nn.CrossEntropyLoss"},
                                    kind="ClassificationTask",
                                    use_class_dict=True,
                                    dense_config={
                                        **dense,
                                        "input_size": m.out_dim,
                                        "output_size": 4,
                                    },
                                ),
                                task(
                                    "track_origin",
                                    "tracks",
                                    "ftagTruthOriginLabel",
                                    {"class_path": "torch.nn.CrossEntropyLoss"},
                                    kind="ClassificationTask",
                                    use_class_dict=True,
                                    weight=0.5,
                                    dense_config={
                                        **dense,
                                        "input_size": m.out_dim,
                                        "output_size": 8,
                                        "context_size": m.out_dim,
                                    },
                                ),
                                task(
                                    "track_vertexing",
                                    "tracks",
                                    "ftagTruthVertexIndex",
                                    {
                                        "class_path": "torch.nn.BCEWithLogitsLoss",
                                        "init_args": {"reduction": "none"},
                                    },
                                    kind="VertexingTask",
                                    weight=1.5,
                                    dense_config={
                                        **dense,
                                        "input_size": 2 * m.out_dim,
                                        "output_size": 1,
                                        "context_size": m.out_dim,
                                    },
                                ),
                            ]
                        },
                    },
                },
            },
        },
        "data": {
            "variables": {"jets": JET_VARIABLES, "tracks": TRACK_VARIABLES},
            "train_file": str(f.train),
            "val_file": str(f.val),
            "test_file": str(f.test),
            "norm_dict": str(f.norm_dict),
            "class_dict": str(f.class_dict),
            "batch_size": s.batch_size,
            "num_workers": 0,
            "persistent_workers": False,
        },
        "trainer": {
            "max_epochs": s.epochs,
            "accelerator": "cpu",
            "devices": 1,
            "precision": 32,
            "logger": False,
            "default_root_dir": str(log_dir),
            "callbacks": [
                {
                    "class_path": "salt.callbacks.Checkpoint",
                    "init_args": {"monitor_loss": "val/jets_classification_loss"},
                },
                {"class_path": "salt.callbacks.PredictionWriter"},
                {
                    "class_path": "lightning.pytorch.callbacks.TQDMProgressBar",
                    "init_args": {"refresh_rate": 50},
                },
            ],
        },
    }


def ensure_old_venv(venv: Path) -> Path:
    """The old tool's `salt` command, installing it into `venv` first if needed."""
    exe = venv / "bin" / "salt"
    if exe.exists():
        return exe
    print(f"installing salt-ml {OLD_VERSION} into {venv} (once)", flush=True)
    run([sys.executable, "-m", "venv", str(venv)])
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    run([*pip, "--no-deps", f"salt-ml=={OLD_VERSION}"])
    run([*pip, *OLD_DEPENDENCIES])
    return exe


def run(cmd: list[str], log: Path | None = None, cwd: Path | None = None) -> float:
    """Run `cmd` (output to `log` when given); its wall time in seconds. A failure stops here."""
    print("$ " + shlex.join(cmd), flush=True)
    start = time.perf_counter()
    if log is None:
        result = subprocess.run(cmd, cwd=cwd)
    else:
        with log.open("w") as out:
            result = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode:
        where = f"; see {log}" if log else ""
        sys.exit(f"compare_with_salt: command failed with exit code {result.returncode}{where}")
    return time.perf_counter() - start


def train_ours(args, m: Model, s: Schedule, f: Files, extra: list[str]) -> dict:
    out = args.work / ("ours" if args.variant is None else f"ours_{args.variant}")
    out.mkdir(parents=True, exist_ok=True)
    done = out / "result.json"
    if done.exists() and not args.retrain:
        return json.loads(done.read_text())
    log = out / "train.log"
    cmd = [sys.executable, "-m", "salt.train", *ours_overrides(m, s, f, args.name, out), *extra]
    seconds = run(cmd, log, cwd=REPO)
    match = re.search(r"salt: run directory (\S+)", log.read_text())
    assert match, f"no run directory in {log}"
    run_dir = Path(match.group(1))
    eval_log = out / "evaluate.log"
    run(
        [
            sys.executable,
            "-m",
            "salt.evaluate",
            f"run_dir={run_dir}",
            f"data.test_file={f.test}",
            "write_tracks=false",
            "progress_bar=false",
            "overwrite=true",
        ],
        eval_log,
        cwd=REPO,
    )
    match = re.search(r"salt: predictions written to (\S+)", eval_log.read_text())
    assert match, f"no predictions file in {eval_log}"
    result = {"train_seconds": seconds, "run_dir": str(run_dir), "predictions": match.group(1)}
    done.write_text(json.dumps(result, indent=1))
    return result


def train_old(args, m: Model, s: Schedule, f: Files) -> dict:
    out = args.work / "old"
    out.mkdir(parents=True, exist_ok=True)
    done = out / "result.json"
    if done.exists() and not args.retrain:
        return json.loads(done.read_text())
    exe = ensure_old_venv(args.venv)
    config = out / "GN2_small.yaml"
    config.write_text(yaml.safe_dump(old_config(m, s, f, args.name, out / "logs"), sort_keys=False))
    seconds = run([str(exe), "fit", "--config", str(config), "--force"], out / "train.log", out)
    run_dirs = sorted((out / "logs").glob(f"{args.name}_*"), key=lambda p: p.stat().st_mtime)
    assert run_dirs, f"no run directory under {out / 'logs'}"
    run_dir = run_dirs[-1]
    run(
        [
            str(exe),
            "test",
            "--config",
            str(run_dir / "config.yaml"),
            "--data.test_file",
            str(f.test),
            "--data.num_test",
            "-1",
        ],
        out / "test.log",
        out,
    )
    found = sorted(run_dir.glob("ckpts/*__test_*.h5"), key=lambda p: p.stat().st_mtime)
    assert found, f"no predictions file under {run_dir / 'ckpts'}"
    result = {"train_seconds": seconds, "run_dir": str(run_dir), "predictions": str(found[-1])}
    done.write_text(json.dumps(result, indent=1))
    return result


# ---- same function: the old tool's weights in our model -------------------------------------
OLD_TASKS = {"0": "jet_classification", "1": "track_origin", "2": "track_vertexing"}


def _dense_index(index: int) -> str:
    """A Linear of the old Dense (`net.<2j>`: Linear, activation, ...) -> ours."""
    return "first.linear" if index == 0 else f"rest.{index - 1}"


def _context_last(name: str, value, context: int):
    """The old tool puts the context before the inputs ([c; x]), ours after ([x; c]): the
    same layer with its first weight's columns rotated."""
    if name.endswith("net.net.0.weight"):
        return value.roll(-context, dims=1)
    return value


def map_old_state(old: dict, m: Model) -> dict:
    """The old tool's GN2 state dict (weights or gradients) under our parameter names."""
    out = {}
    for name, value in old.items():
        parts = name.split(".")
        if parts[-1] in ("register_mask",) or parts[-2:-1] == ["loss"]:
            continue  # buffers: a constant mask, the class weights (from the class dict)
        if name.startswith("init_nets.0.net.net."):
            value = _context_last(name, value, len(JET_VARIABLES))
            out[f"init_nets.tracks.{_dense_index(int(parts[4]))}.{parts[5]}"] = value
        elif name.startswith("tasks."):
            value = _context_last(name, value, m.out_dim if parts[1] != "0" else 0)
            out[f"tasks.{OLD_TASKS[parts[1]]}.net.{_dense_index(int(parts[4]))}.{parts[5]}"] = value
        elif name.startswith("encoder.layers."):
            layer = f"encoder.layers.{parts[2]}"
            tail = ".".join(parts[3:])
            if tail.startswith("attn.fn.in_proj_"):
                kind = "weight" if tail.endswith("weight") else "bias"
                for which, chunk in zip("qkv", value.chunk(3), strict=True):
                    out[f"{layer}.attn.linear_{which}.{kind}"] = chunk
            else:
                renamed = {
                    "attn.fn.out_proj": "attn.linear_out",
                    "dense.fn.in_proj": "ff.first.linear",
                    "dense.fn.out_proj": "ff.rest.1",
                }[tail.rsplit(".", 1)[0]]
                out[f"{layer}.{renamed}.{parts[-1]}"] = value
        elif name.startswith("pool_net.gate_nn."):
            out[f"pooling.gate.{parts[-1]}"] = value
        else:  # encoder.registers, encoder.out_proj.*
            out[name] = value
    return out


GN2 = Model(embed_dim=256, init_hidden=256, num_layers=4, num_heads=8, out_dim=128)


def speed(args, f: Files) -> int:
    """fp32 CPU training speed of the real GN2: the old tool's model step against salt's
    whole loop (data, step), on the same file and batch size."""
    out = args.work / "speed"
    out.mkdir(parents=True, exist_ok=True)
    steps, warmup, batch = args.speed_steps, 2, args.batch_size
    settings = {
        "file": str(f.train),
        "norm_dict": str(f.norm_dict),
        "class_dict": str(f.class_dict),
        "seed": 3,
        "model": vars(GN2) | {"head_hidden": list(GN2.head_hidden)},
        "jet_variables": JET_VARIABLES,
        "track_variables": TRACK_VARIABLES,
        "batch_size": batch,
        "steps": steps,
        "warmup": warmup,
    }
    (out / "settings.json").write_text(json.dumps(settings))
    exe = ensure_old_venv(args.venv)
    script = str(REPO / "scripts" / "old_tool_reference.py")
    old_cmd = [str(exe.parent / "python"), script, "--speed", str(out / "settings.json")]
    run(old_cmd, out / "old.log")
    old = json.loads((out / "old.log").read_text().strip().splitlines()[-1])
    ours_args = ours_overrides(GN2, Schedule(1, batch), f, "GN2", out)
    bench = [sys.executable, str(REPO / "scripts" / "bench_train.py"), "--variant", "auto"]
    bench += ["--steps", str(steps), "--warmup", str(warmup), *ours_args]
    run(bench, out / "ours.log")
    ours = json.loads((out / "ours.log").read_text().strip().splitlines()[-1])
    ratio = ours["jets_per_s"] / old["jets_per_s"]
    table = (
        f"GN2 (real sizes) fp32 training on CPU, batch {batch}, {old['threads']} threads, "
        f"{steps} timed steps:\n"
        f"  old tool (salt-ml {OLD_VERSION}), model step only: {old['jets_per_s']:8.1f} jets/s\n"
        f"  salt, the whole loop ({ours['layout']} layout):     {ours['jets_per_s']:8.1f} jets/s\n"
        f"  salt / old tool: {ratio:.1f}x"
    )
    (out / "speed.md").write_text(table + "\n")
    print(table)
    return 0


def equivalence(args, m: Model, f: Files) -> int:
    """Load the old tool's freshly initialised GN2 into ours; compare losses, jet logits and
    gradients on the same jets (fp64, both of our paths). 0 when they agree."""
    import torch
    from hydra import compose, initialize_config_dir

    import salt.schema  # noqa: F401  (registers the config schemas that conf/ names)
    from salt import models
    from salt.data.ftag import FTAGReader, load_yaml_dict

    out = args.work / "equivalence"
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "file": str(f.train),
        "norm_dict": str(f.norm_dict),
        "class_dict": str(f.class_dict),
        "num_jets": args.equivalence_jets,
        "seed": 3,
        "model": vars(m) | {"head_hidden": list(m.head_hidden)},
        "jet_variables": JET_VARIABLES,
        "track_variables": TRACK_VARIABLES,
    }
    (out / "settings.json").write_text(json.dumps(settings))
    exe = ensure_old_venv(args.venv)
    run(
        [
            str(exe.parent / "python"),
            str(REPO / "scripts" / "old_tool_reference.py"),
            str(out / "settings.json"),
            str(out / "reference.pt"),
        ],
        out / "reference.log",
        out,
    )
    ref = torch.load(out / "reference.pt", weights_only=True)

    schedule = Schedule(1, args.batch_size)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("train", overrides=ours_overrides(m, schedule, f, args.name, out))
    class_dict = load_yaml_dict(f.class_dict, "class_dict")
    variables, labels = models.input_variables(cfg.model), models.label_specs(cfg.model)
    reader = FTAGReader(f.train, variables, load_yaml_dict(f.norm_dict, "norm_dict"), labels)
    inputs, masks, label_arrays = reader.load(0, args.equivalence_jets)
    inputs = {k: torch.from_numpy(v).double() for k, v in inputs.items()}
    masks = {k: torch.from_numpy(v) for k, v in masks.items()}
    label_arrays = {
        t: {k: torch.from_numpy(v) for k, v in g.items()} for t, g in label_arrays.items()
    }
    weights = {"jet_classification": 1.0, "track_origin": 0.5, "track_vertexing": 1.5}
    old_names = {"jet_classification": "jets_classification"}
    expected_grads = map_old_state(ref["grads"], m)
    worst = 0.0
    for backend in ("packed", "padded"):
        tagger = models.build_tagger(cfg.model, class_dict, backend=backend).double()
        tagger.load_state_dict(map_old_state(ref["state_dict"], m), strict=True)
        outputs, losses = tagger(inputs, masks, label_arrays)
        losses["loss"].backward()
        rows = [("jet logits", outputs["jet_classification"].detach(), ref["jet_logits"])]
        for task, w in weights.items():
            old_value = ref["losses"][old_names.get(task, task)] / w
            rows.append((f"{task} loss", losses[task].detach(), torch.tensor(old_value)))
        for name, p in tagger.named_parameters():
            rows.append((f"grad {name}", p.grad, expected_grads[name]))
        print(
            f"{backend} path vs the old tool "
            f"({args.equivalence_jets} jets, fp64): largest relative differences"
        )
        for label, ours, theirs in rows:
            scale = theirs.abs().max().clamp_min(1e-12)
            diff = float((ours - theirs.to(ours.dtype)).abs().max() / scale)
            worst = max(worst, diff)
            if label.startswith(("jet", "track")) or diff > args.equivalence_tol:
                print(f"  {label:<60} {diff:.2e}")
    verdict = "the same function" if worst <= args.equivalence_tol else "DIFFERENT"
    print(
        f"largest relative difference {worst:.2e} (tolerance {args.equivalence_tol:g}): {verdict}"
    )
    return 0 if worst <= args.equivalence_tol else 1


# ---- scoring ----------------------------------------------------------------------------------
def background_efficiency(signal: np.ndarray, background: np.ndarray, eff: float) -> float:
    """Background efficiency of the cut that keeps the fraction `eff` of `signal`.

    Ties at the cut (a count, or many equal values) are shared at random: jets exactly at the
    cut pass with the probability that gives the signal efficiency `eff` exactly (the
    randomised cut, whose ROC interpolates linearly between the achievable points).
    """
    ordered = np.sort(signal)[::-1]
    k = max(math.ceil(eff * len(ordered)) - 1, 0)
    cut = ordered[k]
    above, at = np.mean(signal > cut), np.mean(signal == cut)
    share = (eff - above) / at if at > 0 else 0.0
    return float(np.mean(background > cut) + share * np.mean(background == cut))


def rejection_row(signal: np.ndarray, background: np.ndarray) -> list[tuple[float, float]]:
    """(rejection, binomial error) at each working point."""
    row = []
    for wp in WORKING_POINTS:
        e = background_efficiency(signal, background, wp / 100.0)
        n = len(background)
        if e <= 0:
            row.append((math.inf, math.nan))
            continue
        # sigma(1/e) = sigma(e) / e^2 with sigma(e) = sqrt(e (1 - e) / n)
        row.append((1.0 / e, math.sqrt(e * (1.0 - e) / n) / e**2))
    return row


def tagger_scores(path: Path, f_c: float) -> np.ndarray:
    """D_b from a predictions file (either tool's), in the test file's row order."""
    import hdf5plugin  # noqa: F401  (the old tool's predictions are LZ4-compressed)

    with h5py.File(path, "r") as h5:
        jets = h5["jets"]
        names = jets.dtype.names
        prefix = next(n[: -len("_pb")] for n in names if n.endswith("_pb"))
        p = {c: jets[f"{prefix}_p{c}"].astype(np.float64) for c in ("b", "c", "u")}
    return np.log((p["b"] + 1e-10) / (f_c * p["c"] + (1 - f_c) * p["u"] + 1e-10))


def cut_baselines(test: Path, num: int) -> dict[str, np.ndarray]:
    """Per-jet discriminants from the tracks' signed d0 significance alone."""
    with h5py.File(test, "r") as h5:
        tracks = h5["tracks"].fields([SIGNIFICANCE, "valid"])[:num]
    sig = np.where(tracks["valid"], tracks[SIGNIFICANCE].astype(np.float64), -np.inf)
    ordered = -np.sort(-sig, axis=1)  # descending; missing tracks are -inf
    out = {f"{n}. highest S(d0)": ordered[:, n - 1] for n in (1, 2, 3)}
    for threshold in (2.0, 3.0):
        out[f"N(S(d0) > {threshold:g})"] = (sig > threshold).sum(axis=1).astype(np.float64)
    return out


def format_row(label: str, row: list[tuple[float, float]]) -> str:
    def cell(value: float, error: float) -> str:
        if math.isinf(value):
            return "inf"
        digits = 0 if value >= 100 else 1 if value >= 10 else 2
        return f"{value:.{digits}f} ± {error:.{digits}f}"

    return f"| {label} | " + " | ".join(cell(v, e) for v, e in row) + " |"


def report(args, results: dict[str, dict], f: Files) -> str:
    with h5py.File(f.test, "r") as h5:
        labels = h5["jets"]["flavour_label"][:]
    scores = {name: tagger_scores(Path(r["predictions"]), args.f_c) for name, r in results.items()}
    for name, s in scores.items():
        if len(s) != len(labels):
            sys.exit(
                f"compare_with_salt: {name} scored {len(s)} jets, the test file has {len(labels)}"
            )
    b, c, u = (labels == i for i in (0, 1, 2))
    head = "| b-jet efficiency | " + " | ".join(f"{wp}%" for wp in WORKING_POINTS) + " |"
    lines = [head, "|---" * (len(WORKING_POINTS) + 1) + "|"]
    names = {"old": "old tool", "ours": "salt"}
    if args.variant is not None:
        names["ours"] = f"salt, {args.variant}"
    for flavour, mask in (("light", u), ("c", c)):
        for name, s in scores.items():
            lines.append(
                format_row(f"{flavour} rejection, {names[name]}", rejection_row(s[b], s[mask]))
            )
    for label, s in cut_baselines(f.test, len(labels)).items():
        lines.append(format_row(f"light rejection, {label}", rejection_row(s[b], s[u])))
    lines.append("")
    lines.append(
        f"D_b = ln(p_b / ({args.f_c:g} p_c + {1 - args.f_c:g} p_u)) on {len(labels)} test jets "
        f"({b.sum()} b, {c.sum()} c, {u.sum()} light); errors: binomial on the background "
        "efficiency. Cut baselines: randomised cut at ties."
    )
    for name, r in results.items():
        lines.append(
            f"{names[name]}: training {r['train_seconds'] / 60:.1f} min "
            f"(wall, incl. start-up and validation), run {r['run_dir']}"
        )
    return "\n".join(lines)


# ---- main -------------------------------------------------------------------------------------
def resolve_files(args) -> Files:
    if args.data is None:
        sample = args.work / "sample"
        if not (sample / "test.h5").exists():
            run(
                [
                    sys.executable,
                    "-m",
                    "salt.data.sample",
                    str(sample),
                    "--jets",
                    str(args.jets),
                    "--seed",
                    str(args.sample_seed),
                ],
                cwd=REPO,
            )
        args.data = sample
    d = Path(args.data)
    files = Files(
        Path(args.train or d / "train.h5"),
        Path(args.val or d / "val.h5"),
        Path(args.test or d / "test.h5"),
        Path(args.norm_dict or d / "norm_dict.yaml"),
        Path(args.class_dict or d / "class_dict.yaml"),
    )
    for key, path in vars(files).items():
        if not path.exists():
            sys.exit(f"compare_with_salt: {key} file {path} not found")
    return Files(*(p.resolve() for p in vars(files).values()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("compare_with_salt"),
        help="output directory (default ./compare_with_salt)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        help="directory with train.h5, val.h5, test.h5, "
        "norm_dict.yaml, class_dict.yaml (default: the built-in sample)",
    )
    for key in ("train", "val", "test", "norm-dict", "class-dict"):
        parser.add_argument(f"--{key}", help=f"the {key} file (default: in --data)")
    parser.add_argument(
        "--jets",
        type=int,
        default=200_000,
        help="training jets of the built-in sample (default 200000; val and test: a quarter)",
    )
    parser.add_argument("--sample-seed", type=int, default=1, help="built-in sample seed")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--f-c", type=float, default=0.2)
    parser.add_argument("--name", default="GN2small")
    parser.add_argument("--only", choices=("both", "ours", "old"), default="both")
    parser.add_argument("--retrain", action="store_true", help="train again even if done")
    parser.add_argument(
        "--venv",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "salt"
        / f"salt-ml-{OLD_VERSION}",
        help="the old tool's virtualenv (created if missing)",
    )
    parser.add_argument(
        "--variant",
        help="name of a variant of ours (its overrides after --): trained into ours_<variant>/ "
        "and shown beside the old tool's run of the same --work",
    )
    parser.add_argument(
        "--equivalence",
        action="store_true",
        help="only check that our GN2 with the old tool's weights is the same function "
        "(losses, jet logits, gradients) on the first training jets",
    )
    parser.add_argument(
        "--speed",
        action="store_true",
        help="only compare fp32 CPU training speed of the real GN2 (jets/s, --batch-size)",
    )
    parser.add_argument("--speed-steps", type=int, default=10)
    parser.add_argument("--equivalence-jets", type=int, default=300)
    parser.add_argument("--equivalence-tol", type=float, default=1e-5)
    parser.add_argument(
        "overrides",
        nargs="*",
        help="extra salt.train overrides for our run (after --), e.g. ablations",
    )
    args = parser.parse_args(argv)
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    files = resolve_files(args)
    model, schedule = Model(), Schedule(args.epochs, args.batch_size)
    if args.equivalence:
        return equivalence(args, model, files)
    if args.speed:
        return speed(args, files)
    results = {}
    if args.only in ("both", "old"):
        results["old"] = train_old(args, model, schedule, files)
    elif (args.work / "old" / "result.json").exists():  # shown beside a variant of ours
        results["old"] = json.loads((args.work / "old" / "result.json").read_text())
    if args.only in ("both", "ours"):
        results["ours"] = train_ours(args, model, schedule, files, args.overrides)
    table = report(args, results, files)
    (args.work / f"table{'' if args.variant is None else '_' + args.variant}.md").write_text(
        table + "\n"
    )
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

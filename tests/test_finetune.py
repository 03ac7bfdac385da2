"""Fine-tuning (`finetune.*`): a new run from another run's weights, loaded, excluded or
frozen by parameter-name prefix; clear errors; frozen parameters unchanged by training, also
under DDP; a resumed fine-tuning run continues from its own checkpoint."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from salt.errors import CheckpointError, ConfigError
from salt.models import Tagger, build_tagger
from salt.schema import read_train_config
from salt.training import checkpoint as ckpt
from salt.training.distributed import spawn
from salt.training.finetune import FinetuneConfig, Finetuned, finetune
from salt.training.loop import fit
from tests.conftest import TASKS, model_cfg, snapshot
from tests.test_train import NO_DROPOUT, assert_bitwise_equal, cpu, make_cfg, run_dirs, weights

CPU = torch.device("cpu")
FROZEN = ("init_nets", "encoder")


def tiny_tagger(seed: int, classes: list[str] | None = None) -> Tagger:
    cfg = model_cfg("GN2")
    cfg.embed_dim, cfg.init_net.hidden_layers = 16, [16]
    cfg.encoder.num_layers, cfg.encoder.out_dim, cfg.attention.num_heads = 1, 16, 2
    for task in TASKS:
        cfg.tasks[task].hidden_layers = [8]
    if classes is not None:
        cfg.tasks.jet_classification.class_names = classes
    torch.manual_seed(seed)
    return build_tagger(cfg)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved checkpoint of a tiny tagger (no training needed to load it)."""
    path = tmp_path_factory.mktemp("source") / "source.ckpt"
    state = {"model": tiny_tagger(seed=1).state_dict(), "counters": {"epoch": 3, "step": 120}}
    ckpt.save_checkpoint(state, path)
    return path


def tune(tagger: Tagger, source: Path | str, **keys) -> Finetuned:
    cfg = FinetuneConfig(ckpt_path=str(source), **keys)
    cfg.check("finetune")
    tuned = finetune(tagger, cfg, CPU)
    assert tuned is not None
    return tuned


def same(a: Tagger, b: Tagger, prefix: str = "") -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith(prefix))


def test_every_tensor_that_fits_is_loaded(source: Path) -> None:
    tagger, original = tiny_tagger(seed=2), tiny_tagger(seed=1)
    tuned = tune(tagger, source)
    assert same(tagger, original)
    summary = tuned.summary()
    assert summary.startswith(f"salt: fine-tuning from {source} (epoch 3, step 120): loaded ")
    assert "newly initialised: none; frozen none; checkpoint tensors unused: 0" in summary


def test_excluded_tensors_stay_new_and_frozen_ones_do_not_train(source: Path) -> None:
    tagger, fresh, original = tiny_tagger(seed=2), tiny_tagger(seed=2), tiny_tagger(seed=1)
    tuned = tune(tagger, source, exclude=["tasks.jet_classification"], freeze=list(FROZEN))
    assert same(tagger, fresh, "tasks.jet_classification.")
    assert same(tagger, original, "encoder.") and same(tagger, original, "tasks.track_origin.")
    frozen = {n for n, p in tagger.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(FROZEN) for n in frozen)
    assert {n for n, _ in tagger.named_parameters() if n.startswith(FROZEN)} == frozen
    summary = tuned.summary()
    assert "excluded (tasks.jet_classification)" in summary
    assert "frozen" in summary and "(encoder, init_nets; " in summary
    meta = tuned.metadata(FinetuneConfig(str(source), exclude=["tasks.jet_classification"]))
    assert meta["checkpoint"] == str(source.resolve()) and meta["weights_loaded"]
    assert all(n.startswith("tasks.jet_classification.") for n in meta["new_tensors"])


def test_load_takes_only_the_named_submodules(source: Path) -> None:
    tagger, fresh, original = tiny_tagger(seed=2), tiny_tagger(seed=2), tiny_tagger(seed=1)
    tuned = tune(tagger, source, load=["encoder.layers.0", "pooling"])
    assert same(tagger, original, "encoder.layers.0.") and same(tagger, original, "pooling.")
    assert same(tagger, fresh, "init_nets.") and same(tagger, fresh, "tasks.")
    assert "outside finetune.load (" in tuned.summary()


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            {"exclude": ["tasks.jet_clasification"]},
            r"finetune.exclude: 'tasks.jet_clasification' names no parameter of the model; "
            r"did you mean tasks.jet_classification\? Its submodules: encoder, init_nets, ",
        ),
        (
            {"freeze": ["encoder.layers.1"]},  # one layer: only encoder.layers.0
            r"finetune.freeze: 'encoder.layers.1' names no parameter of the model; did you "
            r"mean encoder.layers.0\?",
        ),
        ({"load": ["decoder"]}, r"finetune.load: 'decoder' names no parameter of the model"),
    ],
)
def test_a_prefix_that_names_nothing_is_one_error_with_the_closest(
    source: Path, keys: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        tune(tiny_tagger(seed=2), source, **keys)


def test_a_shape_mismatch_names_the_tensor_both_shapes_and_what_to_exclude(
    source: Path,
) -> None:
    five = tiny_tagger(seed=2, classes=["b", "c", "u", "tau", "hbb"])
    with pytest.raises(
        ConfigError,
        match=r"finetune: tasks.jet_classification.net.rest.1.weight has shape \[4, 8\] in "
        r".*source.ckpt and \[5, 8\] in the model \(and 1 more tensor\); train it anew "
        r"instead: finetune.exclude=\[tasks.jet_classification\]",
    ):
        tune(five, source)
    tune(five, source, exclude=["tasks.jet_classification"])  # as the message says


def test_a_missing_source_or_bad_settings_are_one_error(source: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no such checkpoint file or run directory"):
        tune(tiny_tagger(seed=2), tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match=r"no epoch checkpoint in .*ckpts; expected a run"):
        tune(tiny_tagger(seed=2), tmp_path)  # a directory without checkpoints
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"is not a salt checkpoint"):
        tune(tiny_tagger(seed=2), tmp_path / "notes.ckpt")
    with pytest.raises(ConfigError, match=r"freezes every parameter: nothing would train"):
        tune(tiny_tagger(seed=2), source, freeze=["init_nets", "encoder", "pooling", "tasks"])
    with pytest.raises(ConfigError, match=r"finetune.freeze needs finetune.ckpt_path"):
        FinetuneConfig(freeze=["encoder"]).check("finetune")
    with pytest.raises(ConfigError, match=r"finetune.freeze needs finetune.ckpt_path"):
        read_train_config(make_cfg(tmp_path, tmp_path, "finetune.freeze=[encoder]"))


# ---- in training runs -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, sample_cache: Path) -> Iterator[Path]:
    """A one-epoch tiny run: the source of the fine-tuning runs below. Read only."""
    tmp = tmp_path_factory.mktemp("finetune_source")
    run = fit(make_cfg(tmp, sample_cache, "trainer.max_epochs=1"), cpu()).run_dir
    assert run is not None
    before = snapshot(tmp)
    yield run
    assert snapshot(tmp) == before, "a test changed the source run"


def best_of(run_dir: Path) -> Path:
    best = ckpt.best_checkpoint(run_dir / "ckpts")
    assert best is not None
    return best


TUNE = [f"finetune.freeze=[{','.join(FROZEN)}]", "finetune.exclude=[tasks.jet_classification]"]


def test_a_finetuned_run_keeps_frozen_weights_and_resumes_from_its_own(
    tmp_path: Path, sample_cache: Path, trained: Path
) -> None:
    source = weights(best_of(trained))
    cfg = make_cfg(tmp_path, sample_cache, f"finetune.ckpt_path={trained}", *TUNE)
    straight = fit(cfg, cpu()).run_dir
    assert straight is not None
    tuned = weights(straight / "ckpts/last.ckpt")
    for name, value in tuned.items():
        if name.startswith(FROZEN):
            assert torch.equal(value, source[name]), name  # bit for bit, after 24 steps
        elif name.startswith("tasks.track_origin"):
            assert not torch.equal(value, source[name]), name  # loaded, then trained
    meta = yaml.safe_load((straight / "metadata.yaml").read_text())["finetuned_from"]
    assert meta["ckpt_path"] == str(trained) and meta["weights_loaded"]
    assert meta["checkpoint"] == str(best_of(trained).resolve())
    assert meta["freeze"] == list(FROZEN) and meta["frozen_tensors"] > 0

    # resumed from its epoch 0: its own weights, not the source's again (which is gone now)
    (epoch0,) = (straight / "ckpts").glob("epoch=000-*.ckpt")
    gone = tmp_path / "moved_away"
    resumed_cfg = make_cfg(
        tmp_path, sample_cache, f"finetune.ckpt_path={gone}", *TUNE, f"ckpt_path='{epoch0}'"
    )
    resumed = fit(resumed_cfg, cpu()).run_dir
    assert resumed is not None
    assert_bitwise_equal(tuned, weights(resumed / "ckpts/last.ckpt"))
    meta = yaml.safe_load((resumed / "metadata.yaml").read_text())["finetuned_from"]
    assert not meta["weights_loaded"] and meta["checkpoint"] is None

    # its optimizer trains the unfrozen parameters only: another freeze cannot continue it
    other = make_cfg(
        tmp_path,
        sample_cache,
        f"finetune.ckpt_path={gone}",
        "finetune.freeze=[init_nets]",
        "finetune.exclude=[tasks.jet_classification]",
        f"ckpt_path='{epoch0}'",
    )
    logs_before = run_dirs(tmp_path)
    with pytest.raises(CheckpointError, match=r"other parameters are frozen \(finetune.freeze\)"):
        fit(other, cpu())
    assert run_dirs(tmp_path) == logs_before  # refused before a run directory was made


def _ddp_rank(rank: int, cfg_dict: dict, out: str) -> None:
    from salt.training.distributed import init_distributed

    run = fit(OmegaConf.create(cfg_dict), init_distributed("cpu", "cpu"))
    torch.save(run.tagger.state_dict(), Path(out) / f"rank{rank}.pt")


def test_ddp_trains_lion_with_frozen_parameters(
    tmp_path: Path, sample_cache: Path, trained: Path
) -> None:
    """Two gloo ranks, with Lion: DDP's reducer leaves the frozen parameters out (no
    find_unused_parameters needed); both ranks end equal, the frozen parameters as loaded."""
    source = weights(best_of(trained))
    copy = tmp_path / "source.ckpt"
    shutil.copyfile(best_of(trained), copy)
    cfg = make_cfg(
        tmp_path,
        sample_cache,
        "trainer.max_epochs=1",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        f"finetune.ckpt_path={copy}",
        *TUNE,
        *NO_DROPOUT,
        "optimizer.name=lion",
    )
    spawn(_ddp_rank, 2, (OmegaConf.to_container(cfg), str(tmp_path)))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert_bitwise_equal(r0, r1)
    for name, value in r0.items():
        if name.startswith(FROZEN):
            assert torch.equal(value, source[name]), name
    assert not torch.equal(r0["pooling.gate.weight"], source["pooling.gate.weight"])

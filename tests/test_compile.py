"""`trainer.compile`: the compiled tagger computes the same function, compiles once, and the
graphs do not multiply as batch size and track count change from batch to batch."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch._dynamo

from salt.errors import ConfigError
from salt.models import build_tagger
from salt.training.loop import fit, setup
from tests.conftest import model_cfg
from tests.test_models_fast_path import make_batch
from tests.test_train import cpu, make_cfg

SHAPES = [(7, 9), (12, 9), (5, 13), (20, 16), (9, 11)]  # (track slots, jets) per batch


def graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def train_outputs(tagger, backend: str) -> list[torch.Tensor]:
    """The loss of each batch of SHAPES and a gradient, computed by `tagger`."""
    results = []
    for i, (slots, jets) in enumerate(SHAPES):
        batch = make_batch(tagger, slots, batch_size=jets, seed=i)
        tagger.zero_grad(set_to_none=True)
        _, losses = tagger(batch["inputs"], batch["pad_masks"], batch["labels"])
        losses["loss"].backward()
        results += [
            losses["loss"].detach(),
            tagger.init_nets["tracks"].first.linear.weight.grad.clone(),
        ]
        if i == 1:
            results.append(torch.tensor(graphs()))  # graphs after two shapes
    return results


@pytest.mark.parametrize(
    ("backend", "compiler"),
    [("padded", "aot_eager"), ("packed", "aot_eager"), ("packed", "inductor")],
)
def test_compiled_tagger_is_the_same_function_and_compiles_once(
    backend: str, compiler: str
) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = build_tagger(model_cfg("GN2"), backend=backend).train()
    eager.encoder.layers = eager.encoder.layers[:2]  # smaller graphs, same structure
    compiled = copy.deepcopy(eager)
    compiled.compile_for(backend, compiler)
    expected = train_outputs(eager, backend)
    got = train_outputs(compiled, backend)
    after_two = int(got.pop(4))
    expected.pop(4)
    assert after_two > 0, "nothing was compiled"
    assert graphs() == after_two, "new graphs for later batch shapes (recompiled)"
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # the state dict keeps its keys: checkpoints of compiled and eager runs are the same
    assert compiled.state_dict().keys() == eager.state_dict().keys()


def test_trainer_compile_trains_and_rejects_unknown_backends(
    tmp_path: Path, sample_cache: Path
) -> None:
    torch._dynamo.reset()
    cfg = make_cfg(
        tmp_path,
        sample_cache,
        "trainer.compile=aot_eager",
        "model.attention.backend=padded",
        "trainer.max_epochs=1",
    )
    run = fit(cfg, cpu())
    assert (run.run_dir / "ckpts" / "last.ckpt").exists()
    bad = make_cfg(tmp_path, sample_cache, "trainer.compile=inductorr")
    with pytest.raises(ConfigError, match=r"trainer.compile='inductorr': expected true, false"):
        setup(bad, cpu())

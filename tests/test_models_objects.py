"""Several object types per jet: one sequence for the encoder (per-type init nets, a type
embedding), tasks on any type, the packed layouts equal to the padded one, and checkpoints of
the single-type tagger still loading."""

from __future__ import annotations

import copy

import pytest
import torch

from salt.models import Tagger, build_tagger
from salt.models.tagger import ALL_OBJECTS, ModelConfigError
from salt.training.device_batches import object_counts
from tests.conftest import model_cfg

TYPES = {"tracks": 5, "flows": 4, "electrons": 3}  # variables per type


def multi_cfg(attention: str | None = None):
    cfg = model_cfg("GN2", attention)
    cfg.embed_dim = 32
    cfg.init_net.hidden_layers = [32]
    cfg.encoder.num_layers = 2
    cfg.encoder.out_dim = 16
    cfg.attention.num_heads = 4
    cfg.variables = {
        "jets": ["pt", "eta"],
        **{t: [f"{t}_{i}" for i in range(n)] for t, n in TYPES.items()},
    }
    for task in cfg.tasks.values():
        task.hidden_layers = [16]
    # a classification task on the flows: charged or neutral
    cfg.tasks.flow_charge = {
        "type": "classification",
        "input": "flows",
        "label": "isCharged",
        "class_names": ["neutral", "charged"],
        "hidden_layers": [16],
        "context": True,
    }
    return cfg


def make_batch(tagger: Tagger, batch_size: int = 8, seed: int = 0) -> dict:
    """Random objects: jet 0 has no object at all, jet 1 no electrons, jet 2 only electrons;
    padding scattered; labels -1 on padding."""
    g = torch.Generator().manual_seed(seed)
    inputs = {"jets": torch.randn(batch_size, 2, generator=g)}
    masks, labels = {}, {"jets": {}}
    for t, n in TYPES.items():
        slots = {"tracks": 7, "flows": 6, "electrons": 2}[t]
        pad = torch.rand(batch_size, slots, generator=g) < 0.4
        pad[0] = True
        if t == "electrons":
            pad[1] = True
            pad[2] = False
        elif t != "electrons":
            pad[2] = True
        masks[t] = pad
        inputs[t] = torch.randn(batch_size, slots, n, generator=g).masked_fill(pad[..., None], 0)
        labels[t] = {}
    for task in tagger.tasks.values():
        if task.input_type == "jets":
            y = torch.randint(0, len(task.class_names), (batch_size,), generator=g)
        else:
            shape = masks[task.input_type].shape
            high = len(task.class_names) if task.class_names else 3
            y = torch.randint(0, high, shape, generator=g).masked_fill(masks[task.input_type], -1)
        labels[task.input_type][task.label] = y
    return {"inputs": inputs, "pad_masks": masks, "labels": labels}


@pytest.mark.parametrize(
    ("attention", "electrons"),
    [("scaled_dot_product", True), ("gatv2", True), ("scaled_dot_product", False)],
)
def test_packed_layouts_equal_the_padded_one(attention: str, electrons: bool) -> None:
    """Also for a batch without any electron (that type's tasks and init net see none)."""
    torch.manual_seed(0)
    tagger = build_tagger(multi_cfg(attention)).double()
    assert tagger.object_types == ["tracks", "flows", "electrons"]
    batch = make_batch(tagger)
    if not electrons:
        batch["pad_masks"]["electrons"][:] = True
        batch["inputs"]["electrons"][:] = 0
    batch = {
        k: {n: (v.double() if v.is_floating_point() else v) for n, v in d.items()}
        if k != "labels"
        else d
        for k, d in batch.items()
    }
    results = {}
    backends = ["padded", "packed"] + (["varlen"] if attention == "scaled_dot_product" else [])
    counts = object_counts(batch["pad_masks"])
    assert set(counts) == {*TYPES, ALL_OBJECTS}
    for backend in backends:
        tagger.backend = backend
        tagger.zero_grad(set_to_none=True)
        outputs, losses = tagger(
            batch["inputs"], batch["pad_masks"], batch["labels"], jets_per_size=counts
        )
        losses["loss"].backward()
        grads = {}
        for n, p in tagger.named_parameters():
            assert p.grad is not None, f"{n}: no gradient ({backend}); DDP needs one"
            grads[n] = p.grad.clone()
        results[backend] = (outputs, losses, grads)
    plain = results["padded"]
    for backend in backends[1:]:
        for a, b in zip(results[backend], plain, strict=True):
            assert a.keys() == b.keys()
            for key in b:
                torch.testing.assert_close(a[key], b[key], rtol=1e-9, atol=1e-11, msg=key)
    outputs = plain[0]
    assert outputs["flow_charge"].shape == (8, 6, 2)
    assert outputs["track_vertexing"].shape == (8, 7, 7)
    # the type embedding learns: its gradient is not zero
    assert plain[2]["type_embedding"].abs().sum() > 0


def test_every_object_reaches_the_jet_output() -> None:
    """Changing one electron changes the jet's prediction: the types share one sequence."""
    torch.manual_seed(1)
    tagger = build_tagger(multi_cfg()).eval()
    batch = make_batch(tagger, seed=3)
    jet = int((~batch["pad_masks"]["electrons"]).any(1).nonzero()[0])
    slot = int((~batch["pad_masks"]["electrons"][jet]).nonzero()[0])
    before, _ = tagger(batch["inputs"], batch["pad_masks"])
    changed = copy.deepcopy(batch)
    changed["inputs"]["electrons"][jet, slot] += 1.0
    after, _ = tagger(changed["inputs"], changed["pad_masks"])
    diff = (after["jet_classification"] - before["jet_classification"]).abs().sum(-1)
    assert diff[jet] > 1e-6
    others = torch.arange(len(diff)) != jet
    assert diff[others].max() == 0  # and no other jet


def test_a_single_type_tagger_is_todays_gn2() -> None:
    """GN2 (tracks only) has no type embedding, the same parameters as before several types,
    and loads a checkpoint of then (its init net was `init_net`)."""
    torch.manual_seed(0)
    gn2 = build_tagger(model_cfg("GN2"))
    assert gn2.type_embedding is None and list(gn2.init_nets) == ["tracks"]
    state = gn2.state_dict()
    old = {
        (k.replace("init_nets.tracks.", "init_net.") if k.startswith("init_nets.") else k): v
        for k, v in state.items()
    }
    assert any(k.startswith("init_net.") for k in old)
    fresh = build_tagger(model_cfg("GN2"))
    fresh.load_state_dict(old)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_config_names_the_object_types() -> None:
    cfg = multi_cfg()
    cfg.tasks.flow_charge.input = "muons"
    with pytest.raises(
        ModelConfigError,
        match=r"tasks\.flow_charge\.input: 'muons' is not an "
        r"input of the model; its object types are \['tracks', 'flows', "
        r"'electrons'\]",
    ):
        build_tagger(cfg)
    cfg = multi_cfg()
    cfg.variables = {"jets": ["pt"]}
    with pytest.raises(ModelConfigError, match="at least one object type"):
        build_tagger(cfg)

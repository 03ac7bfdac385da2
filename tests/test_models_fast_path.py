"""Every attention backend computes the same function as the plain padded path.

`packed` (per-multiplicity blocks) and `varlen` (one call over all jets; on CPU its reference
core, the flash kernel being CUDA-only) against `padded`. Same weights, same batches
(scattered padding, jets without tracks, a jet without padding, several track-slot counts):
outputs, losses and every parameter gradient agree. Tolerances: fp64 1e-10 (the logic is
exact), fp32 1e-5 relative (the same sums in another order and matrix products of other
shapes), bf16 autocast 5e-2 on the losses (bf16 has 8 bits of mantissa; the packed path's
attention core runs in fp32 on CPU).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from salt.models import ModelConfigError, Tagger, build_tagger
from salt.models.dropout import Dropout, dropout
from salt.models.packing import Packing, jets_per_multiplicity
from tests.conftest import model_cfg
from tests.test_models_tagger import batch_with_padding

# (dtype, rtol, atol) for outputs, losses and gradients
PRECISIONS = {"fp64": (torch.float64, 1e-10, 1e-12), "fp32": (torch.float32, 1e-5, 1e-6)}


def make_batch(tagger: Tagger, num_tracks: int, batch_size: int = 9, seed: int = 0) -> dict:
    """Loader-like batch: scattered padding (zero features, labels -1), jets 0 and 3 without
    tracks, jet 1 without padding, jet 2 with one track; some real tracks unlabelled (-1)."""
    g = torch.Generator().manual_seed(seed)
    pad = torch.rand(batch_size, num_tracks, generator=g) < 0.5
    pad[0], pad[1], pad[3] = True, False, True
    pad[2] = True
    pad[2, num_tracks // 2] = False
    return batch_with_padding(tagger, pad, g)


def backends(tagger: Tagger) -> list[str]:
    """The packed layouts this tagger can run (varlen needs scaled dot-product attention)."""
    sdp = tagger.encoder.attention_type == "scaled_dot_product"
    return ["packed", "varlen"] if sdp else ["packed"]


def run_path(tagger: Tagger, batch: dict, backend: str) -> tuple[dict, dict, dict]:
    """Outputs, losses and parameter gradients of one path."""
    tagger.backend = backend
    tagger.zero_grad(set_to_none=True)
    outputs, losses = tagger(batch["inputs"], batch["pad_masks"], batch["labels"])
    losses["loss"].backward()
    grads = {}
    for name, p in tagger.named_parameters():
        assert p.grad is not None, f"no gradient for {name} (backend={backend})"
        grads[name] = p.grad.clone()
    return outputs, {k: v.detach() for k, v in losses.items()}, grads


# The registers' gradient sums over every jet, through a LayerNorm of a near-zero token
# (which scales gradients up ~300x): in fp32 the two summation orders differ by a few 1e-6.
# fp64 holds them to the common tolerance.
LOOSER = {"encoder.registers": 1e-5}


def assert_same(fast: dict, plain: dict, rtol: float, atol: float, what: str) -> None:
    assert fast.keys() == plain.keys()
    for key in plain:
        tol = max(atol, LOOSER.get(key, 0.0)) if fast[key].dtype == torch.float32 else atol
        torch.testing.assert_close(
            fast[key], plain[key], rtol=rtol, atol=tol, msg=lambda m, k=key: f"{what} {k}: {m}"
        )


@pytest.fixture
def tagger(gn2cat_tagger: Tagger) -> Tagger:
    """GN2Cat (GN2 plus the global inputs concatenated after the encoder) with each attention
    and pooling: the session's, shared with test_models_tagger (copied before any change)."""
    return gn2cat_tagger


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("num_tracks", [1, 7, 16])
def test_every_backend_equals_the_padded_path(
    tagger: Tagger, precision: str, num_tracks: int
) -> None:
    dtype, rtol, atol = PRECISIONS[precision]
    model = copy.deepcopy(tagger).to(dtype)
    batch = make_batch(model, num_tracks, seed=num_tracks)
    batch["inputs"] = {k: v.to(dtype) for k, v in batch["inputs"].items()}
    plain_out, plain_loss, plain_grad = run_path(model, batch, "padded")
    pad = batch["pad_masks"]["tracks"]
    pair_pad = pad.unsqueeze(2) | pad.unsqueeze(1)
    for backend in backends(model):
        fast_out, fast_loss, fast_grad = run_path(model, batch, backend)
        assert_same(fast_out, plain_out, rtol, atol, f"{backend} output")
        assert_same(fast_loss, plain_loss, rtol, atol, f"{backend} loss")
        assert_same(fast_grad, plain_grad, rtol, atol, f"{backend} gradient of")
        assert torch.count_nonzero(fast_out["track_origin"][pad]) == 0
        assert torch.count_nonzero(fast_out["track_vertexing"][pair_pad]) == 0
        real_pairs = int((~pair_pad).sum())
        assert torch.count_nonzero(fast_out["track_vertexing"][~pair_pad]) == real_pairs


@pytest.mark.parametrize("num_registers", [0, 3])
def test_packed_path_equals_plain_path_with_other_register_counts(num_registers: int) -> None:
    """No registers (jets without tracks pool to zero) and several (each jet's tokens after
    its tracks): the packed path is still the same function."""
    cfg = model_cfg("GN2")
    cfg.encoder.num_registers = num_registers
    torch.manual_seed(4)
    model = build_tagger(cfg).eval().double()
    assert (model.encoder.registers is None) == (num_registers == 0)
    batch = make_batch(model, 7, seed=3)
    batch["inputs"] = {k: v.double() for k, v in batch["inputs"].items()}
    plain = run_path(model, batch, "padded")
    for backend in backends(model):
        fast = run_path(model, batch, backend)
        for what, a, b in zip(("output", "loss", "gradient of"), fast, plain, strict=True):
            assert_same(a, b, 1e-10, 1e-12, f"{backend} {what}")


def test_training_mode_without_dropout_and_a_batch_without_tracks() -> None:
    """Training mode (dropout off: masks are random) and an all-padded batch, which the
    packed path hands to the padded one: parameters get zero gradients, not None."""
    cfg = model_cfg("GN2")
    for task in cfg.tasks.values():
        task.dropout = 0.0
    cfg.encoder.dropout = 0.0
    torch.manual_seed(1)
    model = build_tagger(cfg).train().double()
    batch = make_batch(model, 12, seed=5)
    batch["inputs"] = {k: v.double() for k, v in batch["inputs"].items()}
    for empty in (False, True):
        if empty:
            batch["pad_masks"]["tracks"][:] = True
            batch["inputs"]["tracks"].zero_()
            for y in batch["labels"]["tracks"].values():
                y.fill_(-1)
        plain = run_path(model, batch, "padded")
        for backend in backends(model):
            fast = run_path(model, batch, backend)
            for what, a, b in zip(("output", "loss", "gradient of"), fast, plain, strict=True):
                assert_same(a, b, 1e-10, 1e-12, f"{backend} {what}")


def test_bf16_autocast_agrees_with_the_plain_path() -> None:
    torch.manual_seed(2)
    model = build_tagger(model_cfg("GN2")).eval()
    batch = make_batch(model, 20, batch_size=32, seed=6)
    results = {}
    for backend in ("padded", "packed", "varlen"):
        model.backend = backend
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs, losses = model(batch["inputs"], batch["pad_masks"], batch["labels"])
        results[backend] = (outputs, losses)
    probs = {b: model.predict(results[b][0])["jet_classification"] for b in results}
    for backend in ("packed", "varlen"):
        for key, loss in results["padded"][1].items():
            torch.testing.assert_close(results[backend][1][key], loss, rtol=5e-2, atol=1e-3)
        torch.testing.assert_close(probs[backend], probs["padded"], rtol=0.0, atol=3e-2)


class VertexingOutput(torch.nn.Module):
    """The tagger's vertexing output from plain tensors, for tracing."""

    def __init__(self, tagger: Tagger) -> None:
        super().__init__()
        self.tagger = tagger

    def forward(self, tracks: torch.Tensor, jets: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        outputs, _ = self.tagger({"tracks": tracks, "jets": jets}, {"tracks": pad})
        return outputs["track_vertexing"]


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")
def test_backend_choice_and_tracing_records_the_padded_path() -> None:
    """auto is packed on CPU; the config key and the build argument set the backend; a
    traced graph (the ONNX export traces) must not freeze the example's packing."""
    tagger = build_tagger(model_cfg("GN1"))
    assert tagger.backend == "auto" and tagger.layout(torch.device("cpu")) == "packed"
    assert build_tagger(model_cfg("GN1"), backend="padded").backend == "padded"
    cfg = model_cfg("GN1")
    cfg.attention.backend = "varlen"
    assert build_tagger(cfg).layout(torch.device("cpu")) == "varlen"
    # on CUDA, auto is varlen under fp16/bf16 (where torch has the kernel), else padded
    assert tagger.layout(torch.device("cuda")) == "padded"
    torch.manual_seed(3)
    model = VertexingOutput(build_tagger(model_cfg("GN1"))).eval()
    example, other = (make_batch(model.tagger, 6, seed=seed) for seed in (1, 2))
    args = [
        (b["inputs"]["tracks"], b["inputs"]["jets"], b["pad_masks"]["tracks"])
        for b in (example, other)
    ]
    # other track multiplicities than the example's
    assert not torch.equal(args[0][2].sum(1).sort()[0], args[1][2].sum(1).sort()[0])
    with torch.no_grad():
        traced = torch.jit.trace(model, args[0], check_trace=False)
        torch.testing.assert_close(traced(*args[1]), model(*args[1]))


def test_backend_config_errors() -> None:
    cfg = model_cfg("GN1")
    cfg.attention.backend = "flash"
    with pytest.raises(
        ModelConfigError,
        match=r"model\.attention\.backend: Invalid value 'flash', expected one of \[auto",
    ):
        build_tagger(cfg)
    cfg = model_cfg("GN1", "gatv2")
    cfg.attention.backend = "varlen"
    with pytest.raises(ModelConfigError, match="varlen needs scaled_dot_product attention"):
        build_tagger(cfg)


def test_host_counted_multiplicities_give_the_same_packing() -> None:
    """The loop counts the multiplicities on the CPU batch (no host sync on a GPU)."""
    pad = torch.rand(11, 6, generator=torch.Generator().manual_seed(7)) < 0.5
    counts = jets_per_multiplicity(pad)
    assert sum(counts) == 11 and len(counts) == 7
    a, b = Packing.from_mask(pad), Packing.from_mask(pad, counts)
    assert a.blocks == b.blocks and torch.equal(a.slot, b.slot)
    lengths = (~pad).sum(1)[a.jet_order]
    assert a.cu_seqlens.tolist() == [0, *lengths.cumsum(0).tolist()]
    assert a.cu_seqlens.dtype == torch.int32
    with pytest.raises(ValueError, match="expected 7"):
        Packing.from_mask(pad, counts[:-1])


# ---- Packing --------------------------------------------------------------------------------
def test_packing_layout_pack_unpack_and_per_track() -> None:
    pad = torch.tensor(
        [
            [False, True, False, True],  # 2 tracks (slots 0, 2)
            [True, True, True, True],  # none
            [False, False, False, False],  # 4
            [True, False, True, True],  # 1 (slot 1)
            [True, False, False, True],  # 2 (slots 1, 2)
        ]
    )
    packing = Packing.from_mask(pad)
    assert packing.jet_order.tolist() == [1, 3, 0, 4, 2]  # by multiplicity, stable
    assert packing.num_empty == 1
    assert [(b.size, b.num_jets) for b in packing.blocks] == [(1, 1), (2, 2), (4, 1)]
    assert packing.slot.tolist() == [13, 0, 2, 17, 18, 8, 9, 10, 11]
    assert packing.num_tracks == 9

    x = torch.arange(5 * 4 * 3, dtype=torch.float32).view(5, 4, 3)
    rows = packing.pack(x)
    torch.testing.assert_close(rows, x.flatten(0, 1)[packing.slot])
    torch.testing.assert_close(packing.unpack(rows), x.masked_fill(pad.unsqueeze(-1), 0.0))

    per_jet = torch.arange(5.0).unsqueeze(1) * 10
    jets = packing.per_track(per_jet).squeeze(1)
    assert jets.tolist() == [30.0, 0.0, 0.0, 40.0, 40.0, 20.0, 20.0, 20.0, 20.0]

    blocks = packing.split(rows)
    assert [tuple(b.shape) for b in blocks] == [(1, 1, 3), (2, 2, 3), (1, 4, 3)]
    torch.testing.assert_close(packing.merge(blocks), rows)


def test_pairs_are_all_ordered_pairs_of_real_tracks_of_a_jet() -> None:
    g = torch.Generator().manual_seed(3)
    pad = torch.rand(6, 5, generator=g) < 0.5
    pad[0] = True
    packing = Packing.from_mask(pad)
    a, b = torch.randn(6, 5, 2, generator=g), torch.randn(6, 5, 2, generator=g)
    pairs = packing.pairwise(packing.pack(a), packing.pack(b))  # [P, 2]
    real = ~pad
    expected = (a.unsqueeze(2) + b.unsqueeze(1))[..., 0]  # [B, T, T] of the first feature
    pair_real = real.unsqueeze(2) & real.unsqueeze(1)
    assert pairs.shape[0] == int(pair_real.sum())
    dense = packing.unpack_pairs(pairs[:, 0])
    torch.testing.assert_close(dense, expected.masked_fill(~pair_real, 0.0))


def test_gradients_through_the_packing_are_exact() -> None:
    """per_track and pairwise sum their gradients over tracks (pairs) without scatter_add."""
    pad = torch.rand(7, 6, generator=torch.Generator().manual_seed(4)) < 0.4
    pad[2] = True
    packing = Packing.from_mask(pad)
    x = torch.randn(packing.num_tracks, 3, dtype=torch.float64, requires_grad=True)
    c = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)

    def f(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        rows = x + packing.per_track(c)
        return packing.unpack_pairs(packing.pairwise(rows, rows * 2).sum(-1)).sin()

    assert torch.autograd.gradcheck(f, (x, c))


def test_a_packing_without_tracks_has_no_blocks() -> None:
    packing = Packing.from_mask(torch.ones(3, 4, dtype=torch.bool))
    assert packing.blocks == () and packing.num_tracks == 0 and packing.num_empty == 3
    with pytest.raises(ValueError, match="without real tracks"):
        packing.merge([])


# ---- Dropout --------------------------------------------------------------------------------
def test_dropout_distribution_scale_and_gradient() -> None:
    torch.manual_seed(5)
    x = torch.randn(400, 500, requires_grad=True)
    y = dropout(x, 0.3)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.005  # 200k draws: sigma 0.001
    torch.testing.assert_close(y[kept], x[kept] / 0.7)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, kept.float() / 0.7)
    # independent draws: two calls differ, and neighbouring elements are uncorrelated
    assert not torch.equal(dropout(x, 0.3) != 0, kept)
    k = kept.float()
    corr = ((k[:, 1:] - 0.7) * (k[:, :-1] - 0.7)).mean() / 0.21
    assert abs(corr.item()) < 0.01


def test_dropout_module_modes_dtypes_and_errors() -> None:
    x = torch.randn(50, 60, dtype=torch.bfloat16)
    layer = Dropout(0.2)
    assert layer(x).dtype == torch.bfloat16
    assert torch.equal(layer.eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert torch.count_nonzero(Dropout(1.0).train()(x)) == 0
    assert torch.equal(F.dropout(x, 0.2, training=False), layer(x))
    with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\], got 1.5"):
        Dropout(1.5)
    assert repr(layer) == "Dropout(p=0.2)"

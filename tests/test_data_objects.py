"""Several object types per jet in the loader, and the per-type reading options: num_inputs,
selections and noise. Real files: the built-in sample (tracks, flows, electrons), written by
the test at a small size."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from salt.data.dataset import H5BatchDataset
from salt.data.ftag import FTAGReader, ObjectOptions
from salt.data.sample import write_sample
from salt.data.sample_objects import ELECTRON_VARIABLES, FLOW_VARIABLES
from salt.data.selections import parse_cut, parse_selections
from salt.errors import ConfigError, DataError

VARS = {
    "jets": ["pt_btagJes", "eta_btagJes"],
    "tracks": ["d0", "z0SinTheta", "numberOfPixelHits"],
    "flows": FLOW_VARIABLES,
    "electrons": ELECTRON_VARIABLES[:6],
}


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(write_sample(tmp_path_factory.mktemp("objects"), 600, seed=3)["train"]).parent


def norm(sample: Path) -> dict:
    return yaml.safe_load((sample / "norm_dict.yaml").read_text())


def dataset(sample: Path, **kw) -> H5BatchDataset:
    kw.setdefault("shuffle", False)
    kw.setdefault("drop_last", False)
    return H5BatchDataset(
        sample / "train.h5", variables=VARS, norm_dict=norm(sample), batch_size=100, **kw
    )


def test_each_object_type_has_its_inputs_and_mask(sample: Path) -> None:
    batch = next(iter(dataset(sample)))
    assert set(batch["inputs"]) == {"jets", "tracks", "flows", "electrons"}
    assert set(batch["pad_masks"]) == {"tracks", "flows", "electrons"}
    with h5py.File(sample / "train.h5") as f:
        valid = {k: f[k]["valid"][:100] for k in ("tracks", "flows", "electrons")}
        flows = f["flows"][:100]
    for name, x in batch["inputs"].items():
        if name == "jets":
            continue
        mask = batch["pad_masks"][name].numpy()
        # each type trimmed to its own longest jet in the batch (real objects come first)
        assert mask.shape == (100, max(valid[name].sum(1).max(), 1))
        assert np.array_equal(~mask, valid[name][:, : mask.shape[1]])
        assert x.shape == (*mask.shape, len(VARS[name]))
        assert (x.numpy()[mask] == 0).all()
    stats = norm(sample)["flows"]["pt"]
    got = batch["inputs"]["flows"][..., 0].numpy()[~batch["pad_masks"]["flows"].numpy()]
    raw = flows["pt"][flows["valid"]]
    np.testing.assert_allclose(got, (raw - stats["mean"]) / stats["std"], rtol=1e-5, atol=1e-5)


def test_num_inputs_keeps_the_first_objects_as_stored(sample: Path) -> None:
    options = ObjectOptions(num_inputs={"flows": 5, "tracks": 3})
    batch = next(iter(dataset(sample, options=options)))
    assert batch["pad_masks"]["flows"].shape[1] == 5
    assert batch["pad_masks"]["tracks"].shape[1] == 3
    full = next(iter(dataset(sample)))
    np.testing.assert_array_equal(
        batch["inputs"]["flows"].numpy(), full["inputs"]["flows"][:, :5].numpy()
    )


def test_selections_drop_failing_objects(sample: Path) -> None:
    cuts = parse_selections({"tracks": ["d0 < 0.05", "numberOfPixelHits >= 3"]})
    batch = next(iter(dataset(sample, options=ObjectOptions(selections=cuts))))
    with h5py.File(sample / "train.h5") as f:
        tracks = f["tracks"][:100]
    keep = tracks["valid"] & (tracks["d0"] < 0.05) & (tracks["numberOfPixelHits"] >= 3)
    real = ~batch["pad_masks"]["tracks"].numpy()
    assert np.array_equal(real.sum(1), keep.sum(1))  # the passing ones, moved to the front
    d0 = tracks["d0"][keep]
    stats = norm(sample)["tracks"]["d0"]
    got = batch["inputs"]["tracks"][..., 0].numpy()[real] * stats["std"] + stats["mean"]
    np.testing.assert_allclose(got, d0, rtol=1e-4, atol=1e-6)


def test_noise_multiplies_training_inputs_reproducibly(sample: Path) -> None:
    options = ObjectOptions(noise={"tracks": {"d0": 0.1}})
    clean = next(iter(dataset(sample, shuffle=True, drop_last=True)))
    noisy = next(iter(dataset(sample, shuffle=True, drop_last=True, options=options)))
    again = next(iter(dataset(sample, shuffle=True, drop_last=True, options=options)))
    assert np.array_equal(noisy["inputs"]["tracks"].numpy(), again["inputs"]["tracks"].numpy())
    real = ~clean["pad_masks"]["tracks"].numpy()
    stats = norm(sample)["tracks"]["d0"]
    raw = clean["inputs"]["tracks"][..., 0].numpy() * stats["std"] + stats["mean"]
    raw_noisy = noisy["inputs"]["tracks"][..., 0].numpy() * stats["std"] + stats["mean"]
    factor = raw_noisy[real] / raw[real]
    assert abs(factor.mean() - 1) < 0.02 and 0.08 < factor.std() < 0.12
    # only d0: the other variables are untouched
    np.testing.assert_array_equal(
        noisy["inputs"]["tracks"][..., 1:].numpy(), clean["inputs"]["tracks"][..., 1:].numpy()
    )
    # evaluation batches (no shuffle) get no noise
    evaluation = next(iter(dataset(sample, options=options)))
    plain = next(iter(dataset(sample)))
    assert np.array_equal(evaluation["inputs"]["tracks"].numpy(), plain["inputs"]["tracks"].numpy())


@pytest.mark.parametrize(
    ("text", "expected"),
    [("d0 < 3.5", ("d0", "<", 3.5)), (" pt>=1e3 ", ("pt", ">=", 1000.0))],
)
def test_cuts_parse(text: str, expected: tuple) -> None:
    cut = parse_cut(text, "data.selections.tracks")
    assert (cut.variable, cut.op, cut.value) == expected


@pytest.mark.parametrize("text", ["d0 << 3", "d0 < abc", "< 3", "d0"])
def test_bad_cut_is_one_error_naming_the_key(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^data\.selections\.tracks: .* is not a cut"):
        parse_selections({"tracks": [text]})


def test_option_errors_name_the_key_and_the_file(sample: Path) -> None:
    path = sample / "train.h5"
    with pytest.raises(DataError, match=r"data\.num_inputs\.muons: the model reads no objects"):
        FTAGReader(path, VARS, norm(sample), options=ObjectOptions(num_inputs={"muons": 2}))
    bad_cut = parse_selections({"tracks": ["d00 < 1"]})
    with pytest.raises(
        DataError,
        match=r"dataset 'tracks' has no variable 'd00'; expected by "
        r"data\.selections\.tracks \(d00 < 1\)",
    ):
        FTAGReader(path, VARS, norm(sample), options=ObjectOptions(selections=bad_cut))
    with pytest.raises(DataError, match=r"data\.noise\.tracks\.dphi: 'dphi' is not an input"):
        FTAGReader(path, VARS, norm(sample), options=ObjectOptions(noise={"tracks": {"dphi": 1}}))
    with pytest.raises(DataError, match=r"no dataset 'muons'"):
        FTAGReader(
            path,
            {**VARS, "muons": ["pt"]},
            {**norm(sample), "muons": {"pt": {"mean": 0, "std": 1}}},
        )


def test_class_names_come_from_the_file(sample: Path) -> None:
    from salt.data.class_names import fill_class_names
    from salt.models.tasks import TaskConfig
    from salt.utils.flavours import canonical_name

    def task(names):
        return TaskConfig(
            type="classification", input="jets", label="flavour_label", class_names=names
        )

    tasks = {"jet_classification": task(None)}
    fill_class_names(tasks, sample / "train.h5", {})
    assert tasks["jet_classification"].class_names == ["bjets", "cjets", "ujets", "taujets"]
    assert canonical_name("b") == canonical_name("bjets") == "bjets"
    fill_class_names({"t": task(["b", "c", "u", "tau"])}, sample / "train.h5", {})  # agree
    fill_class_names({"t": task(["b", "c", "u"])}, sample / "train.h5", {})  # no tau class
    with pytest.raises(
        ConfigError,
        match=r"model\.tasks\.t\.class_names=\['c', 'b', 'u', "
        r"'tau'\] disagrees with .*train\.h5, whose 'jets' label "
        r"'flavour_label' has the classes \['bjets', 'cjets', 'ujets', 'taujets'\]",
    ):
        fill_class_names({"t": task(["c", "b", "u", "tau"])}, sample / "train.h5", {})
    missing = {
        "t": TaskConfig(
            type="classification", input="tracks", label="ftagTruthOriginLabel", class_names=None
        )
    }
    with pytest.raises(ConfigError, match=r"class_names is not set and .* stores no class names"):
        fill_class_names(missing, sample / "train.h5", {})

"""The chunked IterableDataset: coverage per epoch, sharding, order, resume, trimming."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from salt.data.dataset import BatchLoader, H5BatchDataset
from salt.data.ftag import DataError
from tests.conftest import JET_VARS, TRACK_VARS, norm_dict_for, write_ftag_file

VARS = {"jets": JET_VARS, "tracks": TRACK_VARS}
LABELS = {"jets": {"flavour_label": None}, "tracks": {"ftagTruthOriginLabel": None}}


def jet_ids(batch: dict, norm: dict) -> list[int]:
    """Recover file row indices from the normalised pt (which holds the row index)."""
    m, s = norm["jets"]["pt_btagJes"]["mean"], norm["jets"]["pt_btagJes"]["std"]
    return np.rint(batch["inputs"]["jets"][:, 0].numpy() * s + m).astype(int).tolist()


def make(files, norm, **kw) -> H5BatchDataset:
    kw.setdefault("batch_size", 10)
    kw.setdefault("chunk_batches", 3)
    return H5BatchDataset(files, variables=VARS, norm_dict=norm, labels=LABELS, **kw)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_batch_once_per_epoch(tmp_path: Path, world_size: int, num_workers: int) -> None:
    path = write_ftag_file(tmp_path / "f.h5", n_jets=205)
    norm = norm_dict_for(path)
    for epoch in (0, 1):
        seen: list[int] = []
        counts = []
        for rank in range(world_size):
            loader = BatchLoader(make(path, norm, rank=rank, world_size=world_size), num_workers)
            loader.set_epoch(epoch)
            batches = list(loader)
            counts.append(len(batches))
            assert all(len(b["inputs"]["jets"]) == 10 for b in batches)
            for b in batches:
                seen += jet_ids(b, norm)
        assert len(set(counts)) == 1, counts  # equal batch counts on every rank
        assert counts[0] == 20 // world_size == len(loader)
        assert len(seen) == len(set(seen)) == counts[0] * world_size * 10


def test_order_depends_on_seed_and_epoch_not_on_reading(tmp_path: Path) -> None:
    path = write_ftag_file(tmp_path / "f.h5", n_jets=200)
    norm = norm_dict_for(path)

    def order(seed: int, epoch: int) -> list[int]:
        loader = BatchLoader(make(path, norm, seed=seed))
        loader.set_epoch(epoch)
        return [i for b in loader for i in jet_ids(b, norm)]

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)
    assert sorted(order(1, 0)) == list(range(200))
    # weak shuffling: jets are mixed within a chunk, so a batch is not a contiguous range
    first = order(1, 0)[:10]
    assert max(first) - min(first) > 10


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stop_after", [0, 1, 4, 7])
def test_resume_yields_exactly_the_remaining_batches(
    tmp_path: Path, num_workers: int, stop_after: int
) -> None:
    path = write_ftag_file(tmp_path / "f.h5", n_jets=200)
    norm = norm_dict_for(path)
    full = BatchLoader(make(path, norm), num_workers)
    full.set_epoch(3)
    want = [jet_ids(b, norm) for b in full]

    first = BatchLoader(make(path, norm), num_workers)
    first.set_epoch(3)
    got = [jet_ids(b, norm) for b in itertools.islice(first, stop_after)]
    state = first.state_dict()
    assert state == {"epoch": 3, "consumed": stop_after}

    resumed = BatchLoader(make(path, norm), num_workers)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)
    got += [jet_ids(b, norm) for b in resumed]
    assert got == want
    # the next epoch starts from its beginning again
    resumed.set_epoch(4)
    assert len(list(resumed)) == len(want)


def test_trimmed_batches_equal_untrimmed(tmp_path: Path) -> None:
    path = write_ftag_file(tmp_path / "f.h5", n_jets=60, scattered=True)
    norm = norm_dict_for(path)
    kw = {"shuffle": False}
    trimmed = list(BatchLoader(make(path, norm, trim_tracks=True, **kw)))
    full = list(BatchLoader(make(path, norm, trim_tracks=False, **kw)))
    for t, f in zip(trimmed, full, strict=True):
        mask_t, mask_f = t["pad_masks"]["tracks"], f["pad_masks"]["tracks"]
        assert mask_f.shape[1] == 10 and mask_t.shape[1] == (~mask_t).sum(1).max().clamp(min=1)
        torch.testing.assert_close(t["inputs"]["jets"], f["inputs"]["jets"])
        for i in range(len(mask_t)):  # the same real tracks, in the same order
            torch.testing.assert_close(
                t["inputs"]["tracks"][i][~mask_t[i]], f["inputs"]["tracks"][i][~mask_f[i]]
            )
            lt, lf = t["labels"]["tracks"], f["labels"]["tracks"]
            assert torch.equal(
                lt["ftagTruthOriginLabel"][i][~mask_t[i]], lf["ftagTruthOriginLabel"][i][~mask_f[i]]
            )
        assert (t["labels"]["tracks"]["ftagTruthOriginLabel"][mask_t] == -1).all()
        assert (t["inputs"]["tracks"][mask_t] == 0).all()


def test_batch_dtypes_and_keys(tmp_path: Path) -> None:
    path = write_ftag_file(tmp_path / "f.h5", n_jets=30)
    batch = next(iter(BatchLoader(make(path, norm_dict_for(path)))))
    assert batch["inputs"]["jets"].dtype == torch.float32
    assert batch["inputs"]["tracks"].dtype == torch.float32
    assert batch["pad_masks"]["tracks"].dtype == torch.bool
    assert batch["labels"]["jets"]["flavour_label"].dtype == torch.int64
    assert set(batch) == {"inputs", "pad_masks", "labels"}


def test_several_files_glob_and_limits(tmp_path: Path) -> None:
    a = write_ftag_file(tmp_path / "part_0.h5", n_jets=55, seed=1)
    write_ftag_file(tmp_path / "part_1.h5", n_jets=45, seed=2)
    norm = norm_dict_for(a)
    ds = make(str(tmp_path / "part_*.h5"), norm, shuffle=False)
    assert [p.name for p in ds.files] == ["part_0.h5", "part_1.h5"]
    assert ds.num_jets == 100 and len(ds) == 5 + 4  # batches never span files
    limited = make(str(tmp_path / "part_*.h5"), norm, num_jets=70, shuffle=False)
    assert limited.jets_per_file == [55, 15] and len(limited) == 5 + 1
    with pytest.raises(DataError, match=r"num_jets=101 asks for more jets .* \(100\)"):
        make(str(tmp_path / "part_*.h5"), norm, num_jets=101)
    with pytest.raises(DataError, match="matches no file"):
        make(str(tmp_path / "nothing_*.h5"), norm)


def test_no_drop_last_keeps_every_jet_in_order(tmp_path: Path) -> None:
    path = write_ftag_file(tmp_path / "f.h5", n_jets=95)
    norm = norm_dict_for(path)
    for workers in (0, 2):
        loader = BatchLoader(make(path, norm, shuffle=False, drop_last=False), workers)
        ids = sorted(i for b in loader for i in jet_ids(b, norm))
        assert ids == list(range(95))


def test_state_before_iterating_a_new_epoch_is_its_start(tmp_path: Path) -> None:
    path = write_ftag_file(tmp_path / "f.h5", n_jets=60)
    loader = BatchLoader(make(path, norm_dict_for(path)))
    assert len(list(loader)) == 6 and loader.state_dict() == {"epoch": 0, "consumed": 6}
    loader.set_epoch(1)
    assert loader.state_dict() == {"epoch": 1, "consumed": 0}


def test_each_file_is_opened_once_not_per_batch(tmp_path: Path, monkeypatch) -> None:
    """A reader keeps its file open across chunks, batches and epochs (reopening an HDF5 file
    per batch costs milliseconds each on a network filesystem)."""
    import salt.data.ftag as ftag

    paths = [write_ftag_file(tmp_path / f"f{i}.h5", n_jets=120, seed=i) for i in range(2)]
    norm = norm_dict_for(paths[0])
    opened: list[str] = []
    original = ftag.open_h5

    def counted(path):
        opened.append(str(path))
        return original(path)

    monkeypatch.setattr(ftag, "open_h5", counted)
    loader = BatchLoader(make(paths, norm), num_workers=0)
    batches = 0
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        batches += sum(1 for _ in loader)
    assert batches == 2 * 24  # 8 chunks of 3 batches per epoch
    assert sorted(opened) == sorted(str(p) for p in paths)  # once each

"""The benchmark scripts run on any FTAG file: a typo or a hard-wired variable list in them
would only show on the day a benchmark is needed (figures are not asserted: speed is
measured by the scripts, never by tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import TRACK_VARS, norm_dict_for, write_ftag_file

ROOT = Path(__file__).resolve().parents[1]


def test_bench_data_reads_a_model_configs_variables_from_several_files(tmp_path: Path) -> None:
    # files that are not the built-in sample: 3 track variables, GN2's labels
    files = [write_ftag_file(tmp_path / f"part{i}.h5", n_jets=300, seed=i) for i in range(2)]
    (tmp_path / "norm_dict.yaml").write_text(yaml.safe_dump(norm_dict_for(files[0])))
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_data.py"),
            *map(str, files),
            "--batch-size=100",
            "--workers=0,1",
            "--repeat=1",
            "--",
            f"model.variables.tracks=[{','.join(TRACK_VARS)}]",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "600 jets in 2 file(s)" in out.stdout
    assert "loader,  0 workers:" in out.stdout and "loader,  1 workers:" in out.stdout
    assert "per worker" in out.stdout

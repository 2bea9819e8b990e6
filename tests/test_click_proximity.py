"""tools/click_proximity.py: the distance bands it averages over, and a run on the trained test project."""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest

from tests.stage_runner import REPO

SCRIPT = REPO / "tools" / "click_proximity.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("click_proximity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_band_means_average_each_band_of_distance_to_the_nearest_click(tool):
    distance = tool.distance_to_clicks((5, 9), [(2, 0), (2, 8)])
    assert distance[2, 0] == 0 and distance[2, 4] == 4 and distance[0, 1] == pytest.approx(np.hypot(2, 1))
    values = np.arange(45, dtype=float).reshape(5, 9)
    means = tool.band_means(values, distance, (0, 1, 3, 100))
    for (low, high), mean in zip([(0, 1), (1, 3), (3, 100)], means[:3]):
        assert mean == pytest.approx(values[(distance >= low) & (distance < high)].mean())
    assert np.isnan(means[3])  # nothing is 100 px from a click on a 5 x 9 image


def test_the_tool_writes_the_band_table_of_the_posterior_maps(trained_project, tool, monkeypatch, capsys):
    out = trained_project.root / "reports" / "proximity.csv"
    result = trained_project.run("tools/click_proximity.py", "--images", "1", "--clicks", "1", "--threads", "1",
                                 "--bands", "0,8,32", "--out", str(out))
    assert "1 image of the test split, the oracle's first click and 1 random one" in result.stdout
    table = pd.read_csv(out, index_col="map")
    assert list(table.index) == ["mutual_information", "total_entropy", "expected_entropy", "logit_variance"]
    assert list(table.columns) == ["0-8 px", "8-32 px", ">= 32 px"]
    near = table["0-8 px"]
    assert near.notna().all() and (table.loc["logit_variance"].dropna() > 0).all()
    normalised = table.drop(index="logit_variance").to_numpy()
    assert np.nanmax(normalised) <= 1 and np.nanmin(normalised) >= 0

    monkeypatch.setattr("sys.argv", ["click_proximity.py", "--config", str(trained_project.config),
                                     "--out", "/tmp/outside.csv"])
    with pytest.raises(SystemExit) as refused:
        tool.main()
    assert refused.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("click_proximity.py: error: --out: /tmp/outside.csv resolves to")
    assert error.endswith(f"outside {trained_project.root.resolve()}")

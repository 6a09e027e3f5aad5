"""The ``stemst`` command in this process (no torchrun): prepare, fit and predict on a small real store, and the demo
job on cropped settings (its full run, minutes on a CPU, is marked slow)."""

import json

import numpy as np
import pytest

import stemst
import stemst._cli as cli
from stemst._cli import main

KEY = "X_color_stats_context"


@pytest.fixture(scope="module")
def store(her2st_small, tmp_path_factory):
    """C2 and C6 as a zarr store, not yet embedded."""
    path = tmp_path_factory.mktemp("cli") / "c2c6.zarr"
    stemst.io.write_zarr(her2st_small, path)
    return path


def test_prepare_fit_predict_in_process(store, tmp_path):
    prepare = ["prepare", str(store), "--train-sections", "C2", "--encoder", "color_stats", "--no-augment"]
    assert main([*prepare, "--genes", "20", "--no-progress"]) == 0
    table = stemst.io.read_zarr(store).tables["table"]
    assert KEY in table.obsm and int(table.var["stemst_panel"].sum()) == 20

    out = tmp_path / "model"
    fit = ["fit", str(store), "--out", str(out), "--embedding-key", KEY, "--architecture", "mlp", "--steps", "20"]
    assert main([*fit, "--sections", "C2", "--validation", "none", "--seed", "1", "--no-progress"]) == 0
    model = stemst.tl.StemstModel.load(out, device="cpu")
    assert model.steps_trained == 20 and model.genes == list(table.var_names[table.var["stemst_panel"]])
    assert model.embedding_key == KEY and model.training["sections"] == ["C2"]

    assert (
        main(["predict", str(store), "--model", str(out), "--sections", "C6", "--samples", "3", "--no-progress"]) == 0
    )
    sdata = stemst.io.read_zarr(store)
    pred = sdata.tables["stemst_prediction"]
    c6 = table[(table.obs["section"] == "C6").to_numpy()]
    assert pred.shape == (c6.n_obs, 20) and list(pred.var_names) == model.genes
    assert set(pred.obs["spot_id"]) == set(c6.obs["spot_id"])
    # the table holds the model's mean for each C6 spot (the head plus the network's mean: no sampling noise)
    order = [list(c6.obs["spot_id"]).index(s) for s in pred.obs["spot_id"]]
    np.testing.assert_allclose(pred.X, model.predict_mean(c6.obsm[KEY][order]), rtol=1e-4, atol=1e-4)
    assert np.isfinite(pred.layers["std"]).all() and (pred.layers["std"] > 0).mean() > 0.9


def test_demo_job_on_cropped_settings(her2st_c, sdata_copy, tmp_path, monkeypatch):
    """The demo's own code path, end to end through ``stemst demo``, with two training sections, the colour
    statistics in place of the EfficientNet and 20 training steps."""
    monkeypatch.setattr(cli, "TRAIN", ("C2", "C3"))
    monkeypatch.setattr(stemst.datasets, "her2st", lambda sections: sdata_copy(her2st_c))
    embed = stemst.pp.embed_patches

    def colour_stats(sdata, **kwargs):
        return embed(sdata, encoder="color_stats", key_added="X_efficientnet_lite0", progress=False, **kwargs)

    monkeypatch.setattr(stemst.pp, "embed_patches", colour_stats)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--genes", "20", "--steps", "20", "--quick", "--no-cache"]) == 0
    figures = ["sections", "training_curve", "expression_maps", "uncertainty", "variation_curves", "gene_correlation"]
    assert all((out / f"{name}.png").stat().st_size > 10_000 for name in figures)
    metrics = (out / "metrics.csv").read_text().splitlines()
    methods = [line.split(",")[0] for line in metrics[1:]]
    assert methods == [
        "stemst_prediction",
        "ridge_prediction",
        "knn_prediction",
        "mlp_prediction",
        "ridge_prediction_smoothed",
        "library_size_prediction",
    ]
    assert stemst.tl.StemstModel.load(out / "model").steps_trained == 20
    assert json.loads((out / "run.json").read_text())["out"] == str(out)


@pytest.mark.slow
def test_demo_full(tmp_path, data_dir):
    """``stemst demo --quick`` as a user runs it: HER2ST C2-C6, EfficientNet-Lite0, the model's default training."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    table = (out / "metrics.csv").read_text()
    row = next(line for line in table.splitlines() if line.startswith("stemst_prediction"))
    header = table.splitlines()[0].split(",")
    assert float(row.split(",")[header.index("mean_pearson")]) > 0.3

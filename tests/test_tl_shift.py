"""Shift diagnostics (OOD score), depth= and few-shot adaptation on real HER2ST sections (colour statistics)."""

import json
import logging
import warnings

import numpy as np
import pytest

import stemst
from stemst._errors import StemstWarning
from stemst._schema import MEASURED_KEY, OOD_SCORE_KEY, OOD_UNS_KEY
from stemst.tl import StemstModel, adapt, evaluate, predict
from stemst.tl._ood import OODReference

KEY = "X_color_stats"
FAST = {"architecture": "mlp", "network": {"width": 32, "depth": 1}, "steps": 20, "progress": False}


@pytest.fixture(scope="module")
def sdata(doctest_sdata, sdata_copy):
    """C2 and C6 with colour statistics and the 20-gene panel chosen on C2."""
    return sdata_copy(doctest_sdata)


@pytest.fixture(scope="module")
def model(sdata):
    """A small model on C2 (a random half of its spots calibrates the OOD threshold)."""
    return stemst.tl.fit(sdata, embedding_key=KEY, sections="C2", validation=None, **FAST)


@pytest.fixture(scope="module")
def a1(data_dir, sdata):
    """Section A1 (patient A) with colour statistics, in one table with C2 and C6 (patient C)."""
    import anndata as ad
    import spatialdata as sd
    from spatialdata.models import TableModel

    other = stemst.datasets.her2st(["A1"], cache_dir=data_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StemstWarning)  # A1's image is low-resolution
        stemst.pp.embed_patches(other, encoder="color_stats", augment=False, progress=False)
    c, a = sdata.tables["table"], other.tables["table"]
    genes = c.var_names.intersection(a.var_names)
    table = ad.concat([c[:, genes], a[:, genes]], uns_merge="first")
    table.var["stemst_panel"] = c.var.loc[genes, "stemst_panel"].to_numpy()
    table.uns.pop("spatialdata_attrs", None)
    table.obs["region"] = table.obs["region"].astype("category")
    regions = list(table.obs["region"].cat.categories)
    table = TableModel.parse(table, region=regions, region_key="region", instance_key="spot_id")
    return sd.SpatialData(
        images={**sdata.images, **other.images}, shapes={**sdata.shapes, **other.shapes}, tables={"table": table}
    )


def test_ood_threshold_leaves_five_percent_of_unseen_training_like_spots_above(sdata):
    X = np.asarray(sdata.tables["table"].obsm[KEY])
    part = np.random.default_rng(0).permutation(len(X)) % 3  # reference / calibration / unseen, same sections
    ref = OODReference.fit(X[part == 0], X[part == 1], embedding_key=KEY, calibrated_on="test")
    assert np.mean(ref.score(X[part == 1]) > 1) == pytest.approx(0.05, abs=0.01)
    assert 0.0 < np.mean(ref.score(X[part == 2]) > 1) < 0.15


def test_predict_scores_spots_and_warns_only_for_a_shifted_section(sdata, model):
    with warnings.catch_warnings():
        warnings.simplefilter("error", StemstWarning)  # C6, same patient as C2: no warning
        key = predict(model, sdata, sections="C6", n_samples=2, progress=False, overwrite=True)
    pred = sdata.tables[key]
    summary = pred.uns[OOD_UNS_KEY]["C6"]
    assert not summary["warned"] and summary["fraction_ood"] < 0.5
    assert summary["fraction_ood"] == pytest.approx(np.mean(pred.obs[OOD_SCORE_KEY] > 1))
    assert pred.obs["ood"].dtype == bool

    shifted = sdata.tables["table"].copy()  # a darker stain: every colour statistic scaled
    shifted.obsm[KEY] = shifted.obsm[KEY] * 1.3 + 5.0
    with pytest.warns(StemstWarning, match=r"Section 'C6': \d+% of its spots lie outside"):
        out = predict(model, shifted, sections="C6", n_samples=2, progress=False)
    assert out.uns[OOD_UNS_KEY]["C6"]["warned"] and out.uns[OOD_UNS_KEY]["C6"]["fraction_ood"] > 0.5


def test_depth_doubles_expected_counts_and_keeps_normalised_expression(sdata, model):
    ref = model.training["depth"]["median_total_counts"]
    table = sdata.tables["table"]
    c2 = np.asarray(table[table.obs["section"] == "C2"].X.sum(1)).ravel()
    assert ref == np.median(c2)
    base = predict(model, table, sections="C6", n_samples=8, rng=0, progress=False)
    double = predict(model, table, sections="C6", n_samples=8, rng=1, progress=False, depth=2 * ref)
    assert base.uns["stemst_prediction"]["depth"] == ref and double.uns["stemst_prediction"]["depth"] == 2 * ref
    high = base.layers["counts"].mean(0) > 20
    assert high.sum() >= 3
    step = np.log2(double.layers["counts"][:, high]) - np.log2(base.layers["counts"][:, high])
    assert np.abs(step.mean() - 1) < 0.02
    assert (
        np.abs(double.X[:, high].mean(0) - base.X[:, high].mean(0) - 1).max() < 0.05
    )  # log2(2c + 1) ~ log2(c + 1) + 1
    assert np.abs(np.median(double.obsm["samples"][:, :, high] - base.obsm["samples"][:, :, high]) - 1) < 0.05
    norm = stemst.tl.normalized_expression
    np.testing.assert_allclose(norm(double.layers["counts"]), norm(base.layers["counts"]), atol=2e-3)
    measured = predict(model, table, sections="C6", n_samples=2, rng=0, progress=False, depth="measured")
    c6 = np.median(np.asarray(table[table.obs["section"] == "C6"].X.sum(1)))
    assert measured.uns["stemst_prediction"]["depth"] == pytest.approx(c6)
    with pytest.raises(ValueError, match="depth must be"):
        predict(model, table, sections="C6", n_samples=2, progress=False, depth=-1.0)


def test_adapt_lowers_a1_mse_and_records_its_spots(a1, model):
    table = a1.tables["table"]
    adapted = adapt(model, a1, section="A1", spots=20, rng=0)
    assert model.adaptation is None and adapted.adaptation["n_measured"] == 20
    spots = adapted.adaptation["spots"]
    assert len(set(spots)) == 20 and set(table.obs.loc[spots, "section"]) == {"A1"}
    before = predict(model, a1, sections="A1", key_added="before", n_samples=10, progress=False)
    after = predict(adapted, a1, sections="A1", key_added="after", n_samples=10, progress=False)
    assert a1.tables[after].obs[MEASURED_KEY].sum() == 20
    rest = [s for s in a1.tables[before].obs_names if s not in set(spots)]
    res_after = evaluate(a1, pred_key=after, key_added=None)  # skips the 20 measured spots
    res_before = evaluate(a1, pred_key=before, key_added=None)
    assert res_after.summary["n_spots"] == len(rest) == res_before.summary["n_spots"] - 20
    assert res_after.summary["mse"] < 0.75 * res_before.summary["mse"]
    assert res_after.summary["mean_pearson"] >= res_before.summary["mean_pearson"] - 0.01


def test_ood_reference_and_adaptation_survive_save_and_load(sdata, model, tmp_path):
    adapted = adapt(model, sdata, section="C6", spots=10, rng=0)
    loaded = StemstModel.load(adapted.save(tmp_path / "m"), device="cpu")
    assert loaded.adaptation == adapted.adaptation and loaded.ood == adapted.ood
    assert loaded.training["depth"] == model.training["depth"]
    table = sdata.tables["table"]
    a = predict(adapted, table, sections="C6", n_samples=4, rng=0, progress=False)
    b = predict(loaded, table, sections="C6", n_samples=4, rng=0, progress=False)
    np.testing.assert_allclose(a.obsm["samples"], b.obsm["samples"], atol=1e-5)
    np.testing.assert_allclose(a.obs[OOD_SCORE_KEY], b.obs[OOD_SCORE_KEY], rtol=1e-4)


def test_model_saved_without_ood_reference_loads_and_predicts_without_score(sdata, model, tmp_path, caplog):
    path = model.save(tmp_path / "old")
    meta = json.loads((path / "config.json").read_text())
    for k in ("ood", "adaptation"):
        del meta["config"][k]
    del meta["config"]["training"]["depth"]
    (path / "config.json").write_text(json.dumps(meta))
    old = StemstModel.load(path, device="cpu")
    assert old.ood is None and old.adaptation is None
    with caplog.at_level(logging.INFO, logger="stemst"):
        out = predict(old, sdata.tables["table"], sections="C6", n_samples=2, progress=False)
    assert "No out-of-distribution score" in caplog.text and OOD_SCORE_KEY not in out.obs
    with pytest.raises(stemst.StemstDataError, match="depth= needs the training depth"):
        predict(old, sdata.tables["table"], sections="C6", n_samples=2, progress=False, depth=1000.0)


def test_benchmark_records_the_cross_patient_story(sdata, model):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "her2st.py"
    spec = importlib.util.spec_from_file_location("her2st_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rec = bench.cross_patient_record(sdata, model, "C6", {"warned": False, "fraction_ood": 0.1}, ks=(0, 5))
    assert rec["section"] == "C6" and rec["ood"] == {"warned": False, "fraction_ood": 0.1}
    assert [r["n_measured"] for r in rec["adaptation"]] == [0, 5]
    assert [r["n_scored"] for r in rec["adaptation"]] == [178, 173]
    assert all(0 <= r["coverage_50"] <= r["coverage_90"] <= 1 and r["mse"] > 0 for r in rec["adaptation"])
    split = {"test": "C6", "ood_warned": False, "ood": {"fraction_ood": 0.1}}
    text = "\n".join(bench.cross_patient_lines({"splits": [split], "cross_patient": json.loads(json.dumps(rec))}))
    assert "| C6 | 0.10 | no |" in text and "coverage_90" in text


def test_ood_score_of_low_dimensional_features_is_calibrated_not_degenerate():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 8))  # fewer features than OOD_PCS: the subspace keeps half of them out
    ref = OODReference.fit(X[:1000], X[1000:2000], embedding_key="X", calibrated_on="test")
    assert ref.axes.shape == (8, 4)
    assert 0.03 < np.mean(ref.score(X[2000:]) > 1) < 0.08


def test_adaptation_curve_samples_with_the_same_settings_when_adapting_and_predicting(sdata, model, monkeypatch):
    import stemst.tl._adapt as adapt_module

    seen = []
    real = model.sample

    def sample(*args, **kwargs):
        seen.append(kwargs.get("steps"))
        return real(*args, **kwargs)

    monkeypatch.setattr(type(model), "sample", lambda self, *a, **k: sample(*a, **k))
    curve = adapt_module.adaptation_curve(model, sdata, section="C6", n_measured=(5,), n_samples=2, steps=3)
    assert curve["n_measured"].tolist() == [5]
    assert len(seen) >= 2 and set(seen) == {3}  # adapt's samples and predict's samples


def test_ood_distance_is_computed_in_chunks_with_the_same_result(sdata, monkeypatch):
    import stemst.tl._ood as ood_module

    X = np.asarray(sdata.tables["table"].obsm[KEY])
    ref = OODReference.fit(X[::2], X[1::2], embedding_key=KEY, calibrated_on="test")
    whole = ref.distance(X)
    monkeypatch.setattr(ood_module, "DISTANCE_CHUNK", 7)  # many chunks, the last one short
    np.testing.assert_allclose(ref.distance(X.astype(np.float32)), whole, rtol=1e-5)
    np.testing.assert_allclose(ref.distance(X), whole, rtol=1e-12)

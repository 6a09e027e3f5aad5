"""Baselines (ridge, kNN, MLP on scikit-learn): fit on C2-C5 and predict C6 with cheap colour embeddings of the H&E."""

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.model_selection import GridSearchCV, LeaveOneGroupOut
from sklearn.neighbors import KNeighborsRegressor
from sklearn.neural_network import MLPRegressor
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

import stemst
from stemst._schema import StemstDataError, get_image, section_info, section_mask
from stemst.tl._baselines import _fit_ridge
from stemst.tl._data import training_set

TRAIN = ["C2", "C3", "C4", "C5"]
STRIDE = 4


def patch_features(patch):
    """Per-channel mean and std, plus per-quadrant channel means (so flips and rotations change them)."""
    p = patch.astype(np.float32) / 255
    h, w = p.shape[1] // 2, p.shape[2] // 2
    quads = [p[:, :h, :w], p[:, :h, w:], p[:, h:, :w], p[:, h:, w:]]
    return np.concatenate([p.mean((1, 2)), p.std((1, 2))] + [q.mean((1, 2)) for q in quads])


def views_of(patch):
    """The 8 dihedral views of a (c, y, x) patch, view 0 the original."""
    out = []
    for k in range(4):
        r = np.rot90(patch, k, axes=(1, 2))
        out += [r, r[:, :, ::-1]]
    return out


def color_embeddings(sdata, table):
    """Cheap embeddings: colour statistics of the spot-sized patch, from the image subsampled 4x."""
    x = np.zeros((table.n_obs, 18), np.float32)
    v = np.zeros((table.n_obs, 8, 18), np.float32)
    for s in ["C2", "C3", "C4", "C5", "C6"]:
        img = np.asarray(get_image(sdata, s, 0)[:, ::STRIDE, ::STRIDE])
        half = int(section_info(table, s).spot_diameter_px / 2 / STRIDE)
        for i in np.flatnonzero(section_mask(table, s)):
            cx, cy = (table.obsm["spatial"][i] / STRIDE).astype(int)
            patch = img[:, max(cy - half, 0) : cy + half, max(cx - half, 0) : cx + half]
            v[i] = [patch_features(p) for p in views_of(patch)]
            x[i] = v[i, 0]
    table.obsm["X_color"], table.obsm["X_color_views"] = x, v


@pytest.fixture(scope="module")
def sdata(her2st_c, sdata_copy):
    table = her2st_c.tables["table"].copy()
    color_embeddings(her2st_c, table)
    train = table[section_mask(table, TRAIN)]
    mean = np.asarray(train.X.mean(0)).ravel()
    keep = ~table.var_names.str.match(r"^(MT-|RPS|RPL)")
    table.var["stemst_panel"] = False
    table.var.iloc[np.argsort(-np.where(keep, mean, -1))[:40], table.var.columns.get_loc("stemst_panel")] = True
    return sdata_copy(her2st_c, table)


def held_out_pearson(sdata, model, key):
    stemst.tl.predict(model, sdata, sections="C6", key_added=key, progress=False, overwrite=True)
    return stemst.tl.evaluate(sdata, pred_key=key, key_added=None).summary["mean_pearson"]


@pytest.fixture(scope="module")
def shuffled(sdata, sdata_copy):
    """Same data with the training embeddings permuted across spots: no image information left."""
    table = sdata.tables["table"].copy()
    train = np.flatnonzero(section_mask(table, TRAIN))
    perm = np.random.default_rng(0).permutation(train)
    for key in ("X_color", "X_color_views"):
        table.obsm[key][train] = table.obsm[key][perm]
    return sdata_copy(sdata, table)


def held_out_mse_of_training_mean(sdata):
    """MSE on C6 of the mean predictor: every spot gets the training sections' mean target."""
    train = training_set(sdata, embedding_key="X_color", sections=TRAIN)
    test = training_set(sdata, embedding_key="X_color", sections="C6", drop_empty=False)
    return float(np.mean((test.Y - train.Y.mean(0)) ** 2))


FITS = {
    "ridge_cv": ("ridge", {}),
    "ridge_hest": ("ridge", {"alpha": "hest"}),
    "knn": ("knn", {"k": 50}),
    "mlp": ("mlp", {"val_section": "C5", "max_epochs": 60}),
}


@pytest.fixture(scope="module")
def fitted(sdata):
    return {
        name: stemst.tl.fit_baseline(
            sdata, method=method, embedding_key="X_color", sections=TRAIN, progress=False, **kwargs
        )
        for name, (method, kwargs) in FITS.items()
    }


@pytest.mark.parametrize("name", list(FITS))
def test_baselines_predict_held_out_section(sdata, shuffled, fitted, name):
    method, kwargs = FITS[name]
    model = fitted[name]
    assert isinstance(model, stemst.tl.Predictor) and model.method == method and model.n_genes == 40
    r = held_out_pearson(sdata, model, f"{method}_prediction")
    fit = dict(method=method, embedding_key="X_color", sections=TRAIN, progress=False, **kwargs)
    control = held_out_pearson(shuffled, stemst.tl.fit_baseline(shuffled, **fit), "control")
    assert r > 0.25, r
    assert r > control + 0.15, (r, control)  # beats chance: the same fit without image information
    res = stemst.tl.evaluate(sdata, pred_key=f"{method}_prediction", key_added=None)
    assert res.summary["mse"] < held_out_mse_of_training_mean(sdata)  # beats the mean predictor
    pred = sdata.tables[f"{method}_prediction"]
    assert pred.uns["stemst_prediction"]["method"] == method
    assert pred.n_obs == int((sdata.tables["table"].obs["section"] == "C6").sum())
    np.testing.assert_array_equal(pred.layers["std"], 0)  # deterministic


def test_baselines_are_fitted_sklearn_pipelines(sdata, fitted):
    steps = {
        "ridge_cv": [StandardScaler, PCA, Ridge],
        "ridge_hest": [StandardScaler, PCA, Ridge],
        "knn": [StandardScaler, KNeighborsRegressor],
        "mlp": [StandardScaler, MLPRegressor],
    }
    X = sdata.tables["table"].obsm["X_color"][:25]
    for name, model in fitted.items():
        est = model.estimator
        assert isinstance(est, Pipeline), name
        assert [type(step) for _, step in est.steps] == steps[name], name
        check_is_fitted(est)
        assert est.n_features_in_ == 18
        # the predictor is the pipeline: its predictions are the pipeline's, on the target scale
        np.testing.assert_allclose(model.predict_mean(X), est.predict(X.astype(np.float64)), rtol=1e-6)
    ridge = fitted["ridge_cv"]
    assert isinstance(ridge.search, GridSearchCV) and isinstance(ridge.search.cv, LeaveOneGroupOut)
    assert ridge.search.n_splits_ == len(TRAIN)  # one fold per training section
    assert ridge.estimator.named_steps["ridge"].alpha == pytest.approx(ridge.params()["alpha"])
    assert fitted["knn"].estimator[-1].n_neighbors == 50
    mlp = fitted["mlp"]
    best = [h["epoch"] for h in mlp.history if h.get("best")][-1]
    assert mlp.params()["best_epoch"] == best <= len(mlp.history) <= 60
    assert {"epoch", "step", "loss", "val_loss"} <= set(mlp.history[0])


def test_ridge_settings(sdata, fitted):
    hest = fitted["ridge_hest"]
    p = hest.params()
    assert p["n_components"] == 18  # fewer features than 256
    assert p["alpha"] == pytest.approx(100 / (18 * 40))
    cv = fitted["ridge_cv"]
    assert cv.params()["alpha_rule"] == "cv" and len(cv.cv_scores["mean_pearson"]) == 15
    assert np.max(cv.cv_scores["mean_pearson"]) > 0.2
    # the grid is relative to the largest eigenvalue of the training design (standardised, PCA)
    design = cv.estimator[:-1].transform(training_set(sdata, embedding_key="X_color", sections=TRAIN).X)
    top = np.linalg.norm(design - design.mean(0), 2) ** 2
    np.testing.assert_allclose(cv.cv_scores["alpha"], np.asarray(cv.cv_scores["relative_alpha"]) * top, rtol=1e-6)


def test_bad_settings_are_refused(sdata):
    fit = {"embedding_key": "X_color", "sections": TRAIN, "progress": False}
    with pytest.raises(ValueError, match="alpha must be"):
        stemst.tl.fit_baseline(sdata, method="ridge", alpha=-1, **fit)
    with pytest.raises(ValueError, match="alpha must be"):
        stemst.tl.fit_baseline(sdata, method="ridge", alpha="gcv", **fit)
    with pytest.raises(ValueError, match="n_components must be"):
        stemst.tl.fit_baseline(sdata, method="ridge", n_components=0, **fit)
    with pytest.raises(StemstDataError, match="at least 2 training sections"):
        stemst.tl.fit_baseline(sdata, method="ridge", embedding_key="X_color", sections="C2")
    with pytest.raises(ValueError, match="Unknown baseline 'svm'"):
        stemst.tl.fit_baseline(sdata, method="svm", embedding_key="X_color")
    with pytest.raises(TypeError, match="settings of 'knn'"):
        stemst.tl.fit_baseline(sdata, method="knn", alpha=1.0, **fit)
    with pytest.raises(ValueError, match="metric must be"):
        stemst.tl.fit_baseline(sdata, method="knn", metric="manhattan", **fit)
    with pytest.raises(ValueError, match="k must be"):
        stemst.tl.fit_baseline(sdata, method="knn", k=0, **fit)
    with pytest.raises(TypeError, match=r"no \['steps', 'dropout'\] setting.*max_epochs"):
        stemst.tl.fit_baseline(sdata, method="mlp", steps=400, dropout=0.2, **fit)
    with pytest.raises(StemstDataError, match="val_section='C6' must be one of several training sections"):
        stemst.tl.fit_baseline(sdata, method="mlp", val_section="C6", **fit)
    with pytest.raises(ValueError, match="validation_fraction must be"):
        stemst.tl.fit_baseline(sdata, method="mlp", validation_fraction=1.5, **fit)
    with pytest.raises(ValueError, match="max_epochs must be"):
        stemst.tl.fit_baseline(sdata, method="mlp", max_epochs=0, **fit)


def test_predict_refuses_other_embeddings(sdata, fitted):
    table = sdata.tables["table"][:50].copy()
    table.obsm["X_color"] = table.obsm["X_color"][:, :10]
    with pytest.raises(StemstDataError, match="10-d; the model expects 18-d"):
        stemst.tl.predict(fitted["knn"], table)
    del table.obsm["X_color"]
    with pytest.raises(KeyError, match="X_color"):
        stemst.tl.predict(fitted["knn"], table)


def test_ridge_recovers_a_linear_map():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 4))
    B = rng.normal(size=(4, 3))
    Y = X @ B + np.array([1.0, -2.0, 0.5])
    base = {"genes": ["a", "b", "c"], "embedding_key": "X", "transform": "log2p1", "encoder": None}
    # the full probe (standardise + PCA + ridge) with alpha -> 0 predicts new points exactly
    model = _fit_ridge(X, Y, np.zeros(50), alpha=1e-10, settings={}, **base)
    X_new = rng.normal(size=(10, 4))
    np.testing.assert_allclose(model.predict_mean(X_new), X_new @ B + [1.0, -2.0, 0.5], atol=1e-6)
    # a huge penalty shrinks every coefficient to zero: the prediction is the training mean
    flat = _fit_ridge(X, Y, np.zeros(50), alpha=1e12, settings={}, **base)
    np.testing.assert_allclose(flat.predict_mean(X_new), np.broadcast_to(Y.mean(0), (10, 3)), atol=1e-6)


def test_knn_k1_reproduces_training_targets(sdata):
    knn = stemst.tl.fit_baseline(sdata, method="knn", embedding_key="X_color", sections=TRAIN, k=1, metric="euclidean")
    ts = training_set(sdata, embedding_key="X_color", sections=TRAIN)  # the training spots (empty ones dropped)
    np.testing.assert_array_equal(knn.predict_mean(ts.X), ts.Y)
    np.testing.assert_array_equal(knn.neighbours(ts.X[:20])[:, 0], np.arange(20))
    table = sdata.tables["table"]
    # k larger than the training set is clipped
    tiny = stemst.tl.fit_baseline(sdata, method="knn", embedding_key="X_color", sections="C2", k=10_000)
    assert tiny.params()["k"] == tiny.params()["n_train"] <= int(section_mask(table, "C2").sum())


def test_augment_and_determinism(sdata):
    kw = {"method": "mlp", "embedding_key": "X_color", "sections": TRAIN, "max_epochs": 8, "progress": False}
    a = stemst.tl.fit_baseline(sdata, augment=True, rng=3, **kw)
    b = stemst.tl.fit_baseline(sdata, augment=True, rng=3, **kw)
    c = stemst.tl.fit_baseline(sdata, augment=True, rng=4, **kw)
    X = sdata.tables["table"].obsm["X_color"][:20]
    np.testing.assert_array_equal(a.predict_mean(X), b.predict_mean(X))
    assert not np.allclose(a.predict_mean(X), c.predict_mean(X))
    assert [h["epoch"] for h in a.history] == list(range(1, len(a.history) + 1))
    assert a.params()["augment"] is True and a.params()["val_section"].startswith("random")
    ridge = stemst.tl.fit_baseline(
        sdata, method="ridge", embedding_key="X_color", sections=TRAIN, alpha=1.0, augment=True
    )
    ridge_plain = stemst.tl.fit_baseline(sdata, method="ridge", embedding_key="X_color", sections=TRAIN, alpha=1.0)
    assert ridge.params()["augment"] is True
    assert not np.allclose(ridge.predict_mean(X), ridge_plain.predict_mean(X))  # the views are used


@pytest.fixture(scope="module")
def noisy(sdata):
    return stemst.tl.fit_baseline(sdata, method="ridge", embedding_key="X_color", sections=TRAIN, noise="gauss")


def test_noisy_baseline_calibrates_on_the_held_out_section_fit_uses(sdata, noisy, fitted):
    """The noise comes from the residuals on C5 (fit's held-out section) of a ridge fitted on C2-C4 alone."""
    c5 = training_set(sdata, embedding_key="X_color", sections="C5")
    assert isinstance(noisy, stemst.tl.NoisyBaseline) and noisy.method == "ridge+gauss" and noisy.held_out == "C5"
    assert noisy.residuals.shape == (c5.n_spots, 40)
    inner = stemst.tl.fit_baseline(sdata, method="ridge", embedding_key="X_color", sections=TRAIN[:3])
    np.testing.assert_allclose(noisy.residuals, c5.Y - inner.predict_mean(c5.X), atol=1e-6)
    # the mean is the ridge fitted on all four sections
    X = training_set(sdata, embedding_key="X_color", sections="C6").X
    np.testing.assert_allclose(noisy.predict_mean(X), fitted["ridge_cv"].predict_mean(X))


@pytest.mark.parametrize("kind", ["gauss", "mvn", "resid"])
def test_noisy_baselines_sample_their_noise_model_and_beat_the_point_prediction(sdata, noisy, fitted, kind):
    model = noisy.with_noise(kind)
    X = training_set(sdata, embedding_key="X_color", sections="C6", drop_empty=False).X
    draws = model.sample(X, n_samples=40, rng=0)
    noise = model.noise_draws((40, len(X)), rng=0)  # the same draws, before the mean and the floor at 0
    np.testing.assert_allclose(draws, np.maximum(model.predict_mean(X) + noise, 0), atol=1e-5)
    assert draws.min() == 0.0
    noise = noise.reshape(-1, 40)
    if kind == "resid":  # every noise vector is one of the held-out residual vectors
        dist = np.abs(noise[:200, None] - noisy.residuals[None]).max(2).min(1)  # to the nearest residual vector
        assert dist.max() < 1e-4
    else:  # zero mean, the residuals' root mean square per gene
        rms = np.sqrt((noisy.residuals**2).mean(0))
        np.testing.assert_allclose(noise.std(0), rms, rtol=0.1)
        assert np.abs(noise.mean(0)).max() < 0.1 * rms.max()
    if kind != "gauss":  # gene-gene structure kept: the noise's correlations follow the residuals'
        a, b = np.corrcoef(noise.T)[np.triu_indices(40, 1)], np.corrcoef(noisy.residuals.T)[np.triu_indices(40, 1)]
        assert np.corrcoef(a, b)[0, 1] > 0.9
    stemst.tl.predict(model, sdata, sections="C6", key_added="noisy", n_samples=20, progress=False, overwrite=True)
    res = stemst.tl.evaluate(sdata, pred_key="noisy", key_added=None).summary
    stemst.tl.predict(fitted["ridge_cv"], sdata, sections="C6", key_added="point", progress=False, overwrite=True)
    point = stemst.tl.evaluate(sdata, pred_key="point", key_added=None).summary
    pred = sdata.tables["noisy"]  # centred on the mean model, not on the noisy mean of its samples
    np.testing.assert_allclose(pred.X, np.maximum(noisy.predict_mean(X), 0), atol=1e-5)
    np.testing.assert_allclose(pred.layers["counts"], 2.0**pred.X - 1, rtol=1e-4, atol=1e-4)
    assert res["mean_pearson"] == pytest.approx(point["mean_pearson"], abs=2e-3)
    assert res["crps"] < 0.9 * point["crps"]  # calibrated spread beats a point mass on the proper score
    assert res["energy_score"] < point["energy_score"]
    assert 0.75 < res["coverage_90"] < 0.97
    assert np.isfinite(res["variogram_score"]) and res["crps_counts"] > 0


def test_noisy_baseline_refuses_an_unknown_noise(sdata):
    with pytest.raises(ValueError, match="Unknown noise 'laplace'"):
        stemst.tl.fit_baseline(sdata, method="ridge", embedding_key="X_color", sections=TRAIN, noise="laplace")

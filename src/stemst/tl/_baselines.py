"""Honest baselines on the same embeddings and targets as the diffusion model: ridge, k-nearest neighbours, MLP.

Each is a :class:`~stemst.tl.Predictor` wrapping a fitted scikit-learn estimator (``model.estimator``, a
:class:`~sklearn.pipeline.Pipeline` from embeddings to targets), so :func:`stemst.tl.predict` serves them and writes
the same prediction table as for the diffusion model, and :func:`stemst.tl.evaluate` scores them the same way.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.metrics import make_scorer
from sklearn.model_selection import GridSearchCV, LeaveOneGroupOut
from sklearn.neighbors import KNeighborsRegressor
from sklearn.neural_network import MLPRegressor
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from stemst._docs import (
    doc_embedding_key,
    doc_layer,
    doc_params,
    doc_progress,
    doc_rng,
    doc_table_key,
    doc_transform,
)
from stemst._early_stopping import train_early_stopped, validation_rows
from stemst._logging import logger
from stemst._schema import TABLE_KEY, UNS_KEY, StemstDataError
from stemst._utils import RNGLike, as_generator
from stemst.metrics import mean_pearson
from stemst.tl._base import Predictor
from stemst.tl._data import as_tables, holdout_groups, training_set
from stemst.tl._noise import NOISE_KINDS, NoisyBaseline

#: PCA dimension of the HEST-Benchmark ridge probe
HEST_PCA_DIM = 256
#: ``alpha="cv"`` grid, relative to the largest eigenvalue of the training design (Z^T Z)
CV_ALPHA_GRID = tuple(np.logspace(-6, 1, 15))
BASELINES = ("ridge", "knn", "mlp")
#: settings of the torch MLP that preceded the scikit-learn one, and what replaced them
_RETIRED_MLP = {
    "steps": "max_epochs",
    "eval_every": "(evaluated every epoch)",
    "dropout": "alpha (L2 penalty)",
    "weight_decay": "alpha (L2 penalty)",
}


class _Baseline(Predictor):
    """A deterministic baseline: a fitted scikit-learn regressor ``estimator`` maps embeddings to targets."""

    def __init__(
        self,
        *,
        estimator: Any,
        genes: list[str],
        embedding_key: str,
        transform: str,
        encoder: dict | None,
        settings: dict,
    ) -> None:
        super().__init__(genes=genes, embedding_key=embedding_key, transform=transform, encoder=encoder)
        self.estimator = estimator
        self.settings = dict(settings)

    @property
    def embedding_dim(self) -> int:
        """Width of the embeddings the estimator was fitted on (checked by :meth:`check_table`)."""
        return int(self.estimator.n_features_in_)

    def predict_mean(self, X: np.ndarray) -> np.ndarray:
        """``(n, n_genes)`` predictions on the model scale."""
        return np.asarray(self.estimator.predict(np.asarray(X, np.float64)), np.float64).reshape(len(X), -1)

    def sample(
        self, X: np.ndarray, *, n_samples: int = 1, rng: RNGLike = None, progress: bool = True, **kwargs: Any
    ) -> np.ndarray:
        """Return the deterministic prediction repeated ``n_samples`` times, ``(n_samples, n, n_genes)`` float32."""
        y = self.predict_mean(np.asarray(X, np.float32)).astype(np.float32)
        return np.broadcast_to(y, (n_samples, *y.shape)).copy()

    def params(self) -> dict[str, Any]:
        """Return the method, embedding, transform and the baseline's settings."""
        return {
            **super().params(),
            **{k: v for k, v in self.settings.items() if isinstance(v, str | int | float | bool)},
        }

    def __repr__(self) -> str:
        extra = ", ".join(f"{k}={v!r}" for k, v in self.settings.items() if isinstance(v, str | int | float | bool))
        return f"{type(self).__name__}(genes={self.n_genes}, embedding_key={self.embedding_key!r}, {extra})"


# ----------------------------------------------------------------------------------------------------------------
# ridge


class RidgeBaseline(_Baseline):
    """Standardise, project on the top principal components, ridge regression (the HEST-Benchmark linear probe).

    ``estimator`` is a fitted ``Pipeline(StandardScaler, PCA, Ridge)``; with ``alpha="cv"``, ``search`` is the fitted
    :class:`~sklearn.model_selection.GridSearchCV` and ``cv_scores`` its leave-one-section-out mean Pearson r per
    penalty.
    """

    method = "ridge"


def _cv_score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Score a CV fold in scikit-learn's argument order: :func:`stemst.metrics.mean_pearson`, -1 if undefined."""
    return mean_pearson(y_pred, y_true, undefined=-1.0)


def _ridge_pipeline(n_components: int, alpha: float = 1.0, memory: str | None = None) -> Pipeline:
    return Pipeline(
        [
            ("scale", StandardScaler()),
            ("pca", PCA(n_components=n_components, svd_solver="full")),
            ("ridge", Ridge(alpha=alpha)),
        ],
        memory=memory,
    )


def _fit_ridge(
    X: np.ndarray,
    Y: np.ndarray,
    groups: np.ndarray,
    *,
    alpha: float | str = "cv",
    n_components: int = HEST_PCA_DIM,
    alpha_grid: Sequence[float] = CV_ALPHA_GRID,
    **base: Any,
) -> RidgeBaseline:
    """Fit the ridge probe.

    ``alpha="hest"`` uses the HEST-Benchmark setting ``100 / (n_components * n_genes)`` (there with scikit-learn's
    ``Ridge(fit_intercept=False)`` on standardised, PCA-256 embeddings; the PCA scores are centred, so its
    coefficients equal ours, which also fit the target mean as intercept). ``alpha="cv"`` picks it by
    leave-one-section-out CV (:class:`~sklearn.model_selection.LeaveOneGroupOut`, scored by the mean per-gene
    Pearson r) over ``alpha_grid``, relative to the largest eigenvalue of the training design ``Z^T Z`` so that it
    adapts to the number of spots; a number is used as is.
    """
    if not (isinstance(alpha, str) and alpha in ("cv", "hest")) and not (
        isinstance(alpha, int | float) and not isinstance(alpha, bool) and alpha >= 0
    ):
        raise ValueError(f"alpha must be 'cv', 'hest' or a non-negative number, got {alpha!r}.")
    if int(n_components) < 1:
        raise ValueError(f"n_components must be >= 1, got {n_components}.")
    folds = np.unique(groups)
    if alpha == "cv" and len(folds) < 2:
        raise StemstDataError(f"alpha='cv' needs at least 2 training sections (leave one out), got {folds.tolist()}.")
    # PCA needs no more components than the smallest training set (of the CV folds) has spots minus one
    n_min = min(int((groups != f).sum()) for f in folds) if alpha == "cv" else len(X)
    p = max(1, min(int(n_components), X.shape[1], n_min - 1))
    search, cv_scores = None, None
    if alpha == "cv":
        top = float(_ridge_pipeline(p)[:-1].fit(X).named_steps["pca"].singular_values_[0] ** 2)
        alphas = [float(g) * top for g in alpha_grid]
        with tempfile.TemporaryDirectory(prefix="stemst_ridge_") as cache:  # fit scaler + PCA once per fold
            search = GridSearchCV(
                _ridge_pipeline(p, memory=cache),
                {"ridge__alpha": alphas},
                scoring=make_scorer(_cv_score),
                cv=LeaveOneGroupOut(),
                error_score="raise",
            ).fit(X, Y, groups=groups)
            estimator = search.best_estimator_.set_params(memory=None)
        value = float(search.best_params_["ridge__alpha"])
        scores = search.cv_results_["mean_test_score"]
        cv_scores = {
            "relative_alpha": list(map(float, alpha_grid)),
            "alpha": alphas,
            "mean_pearson": [float(s) for s in scores],
        }
        best = int(search.best_index_)
        logger.info(
            "Ridge CV over %d sections: best relative alpha %.2g (mean r %.3f)",
            len(folds),
            alpha_grid[best],
            scores[best],
        )
    else:
        value = 100.0 / (p * Y.shape[1]) if alpha == "hest" else float(alpha)
        estimator = _ridge_pipeline(p, value).fit(X, Y)
    settings = {
        **base.pop("settings"),
        "alpha": value,
        "alpha_rule": alpha if isinstance(alpha, str) else "fixed",
        "n_components": p,
    }
    model = RidgeBaseline(estimator=estimator, settings=settings, **base)
    model.search, model.cv_scores = search, cv_scores
    return model


# ----------------------------------------------------------------------------------------------------------------
# k nearest neighbours


class KNNBaseline(_Baseline):
    """Mean target of the ``k`` training spots nearest in standardised embedding space (BLEEP's inference rule).

    ``estimator`` is a fitted ``Pipeline(StandardScaler, KNeighborsRegressor)``.
    """

    method = "knn"

    def neighbours(self, X: np.ndarray) -> np.ndarray:
        """``(n, k)`` indices of the nearest training rows, nearest first."""
        Xs = self.estimator[:-1].transform(np.asarray(X, np.float64))
        return self.estimator[-1].kneighbors(Xs, return_distance=False)


def _fit_knn(
    X: np.ndarray, Y: np.ndarray, groups: np.ndarray, *, k: int = 50, metric: str = "cosine", **base: Any
) -> KNNBaseline:
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}.")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    k_used = min(int(k), len(X))
    if k_used < k:
        logger.warning("k=%d exceeds the %d training spots; using k=%d", k, len(X), k_used)
    estimator = Pipeline(
        [("scale", StandardScaler()), ("knn", KNeighborsRegressor(n_neighbors=k_used, metric=metric))]
    ).fit(X, Y)
    settings = {**base.pop("settings"), "k": k_used, "metric": metric}
    return KNNBaseline(estimator=estimator, settings=settings, **base)


# ----------------------------------------------------------------------------------------------------------------
# MLP


class MLPBaseline(_Baseline):
    """One hidden layer on standardised embeddings, trained on standardised targets, early-stopped on held-out data.

    ``estimator`` is a fitted ``Pipeline(StandardScaler, MLPRegressor)`` that predicts on the target scale (the
    target standardisation is folded into the output layer); ``history`` holds the training and held-out loss per
    epoch.
    """

    method = "mlp"


def _fit_mlp(
    X: np.ndarray,
    Y: np.ndarray,
    groups: np.ndarray,
    *,
    spots: np.ndarray | None = None,
    hidden: int = 256,
    alpha: float = 300.0,
    batch_size: int = 128,
    lr: float = 1e-3,
    max_epochs: int = 200,
    patience: int = 10,
    val_section: str | None = None,
    validation_fraction: float = 0.15,
    rng: RNGLike = 0,
    progress: bool = True,
    **base: Any,
) -> MLPBaseline:
    """Train :class:`~sklearn.neural_network.MLPRegressor` (Adam) one epoch at a time with ``partial_fit``.

    The held-out rows (``val_section``, else a random ``validation_fraction`` of the training spots) are scored
    after every epoch; training stops after ``patience`` epochs without a lower held-out MSE, and the network of
    the best epoch is kept. The scalers are fitted on the rows trained on.
    """
    sizes = {"hidden": hidden, "batch_size": batch_size, "max_epochs": max_epochs, "patience": patience}
    for name, value in sizes.items():
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}.")
    gen = as_generator(rng)
    seed = int(gen.integers(2**31 - 1))
    spots = np.arange(len(X)) if spots is None else spots
    val = validation_rows(groups, spots, val_section, validation_fraction, seed)
    x_scaler = StandardScaler().fit(X[~val])
    y_scaler = StandardScaler().fit(Y[~val])
    x_tr, x_val = (x_scaler.transform(X[m]).astype(np.float32) for m in (~val, val))
    y_tr, y_val = (y_scaler.transform(Y[m]).astype(np.float32) for m in (~val, val))
    mlp = MLPRegressor(
        hidden_layer_sizes=(int(hidden),),
        alpha=alpha,
        batch_size=min(int(batch_size), len(x_tr)),
        learning_rate_init=lr,
        random_state=np.random.RandomState(seed),  # an instance, so the shuffles differ between epochs
    )
    # the network is small: one BLAS thread is as fast and avoids oversubscription (10x slower on a busy machine)
    with threadpool_limits(limits=1, user_api="blas"):
        best_mlp, best, history = train_early_stopped(
            mlp, (x_tr, y_tr), (x_val, y_val), max_epochs=int(max_epochs), patience=int(patience), progress=progress
        )
    # fold the target standardisation into the output layer: the pipeline then predicts on the target scale
    best_mlp.coefs_[-1] = best_mlp.coefs_[-1] * y_scaler.scale_.astype(np.float32)
    best_mlp.intercepts_[-1] = (best_mlp.intercepts_[-1] * y_scaler.scale_ + y_scaler.mean_).astype(np.float32)
    estimator = Pipeline([("scale", x_scaler), ("mlp", best_mlp)])
    best_epoch = next((h["epoch"] for h in reversed(history) if h.get("best")), len(history))
    logger.info("MLP: best held-out MSE %.4f at epoch %d of %d", best, best_epoch, len(history))
    settings = {
        **base.pop("settings"),
        "hidden": int(hidden),
        "alpha": float(alpha),
        "lr": float(lr),
        "batch_size": int(mlp.batch_size),
        "val_section": val_section if val_section is not None else f"random {validation_fraction:g} of spots",
        "best_epoch": best_epoch,
        "epochs": len(history),
        "best_val_loss": float(best),
    }
    model = MLPBaseline(estimator=estimator, settings=settings, **base)
    model.history = history
    return model


_FITTERS = {"ridge": _fit_ridge, "knn": _fit_knn, "mlp": _fit_mlp}


@doc_params(
    embedding_key=doc_embedding_key,
    transform=doc_transform,
    table_key=doc_table_key,
    layer=doc_layer,
    rng=doc_rng,
    progress=doc_progress,
)
def fit_baseline(
    data: Any,
    *,
    method: str = "ridge",
    embedding_key: str,
    genes: str | Iterable[str] | None = None,
    sections: str | Iterable[str] | None = None,
    transform: str = "log2p1",
    augment: bool = False,
    table_key: str = TABLE_KEY,
    layer: str | None = None,
    rng: RNGLike = 0,
    progress: bool = True,
    noise: str | None = None,
    validation: str | None = "auto",
    **method_kwargs: Any,
) -> Predictor:
    """Fit a baseline on the same embeddings and targets as :func:`stemst.tl.fit`.

    Every baseline is a scikit-learn :class:`~sklearn.pipeline.Pipeline`, fitted and kept as ``model.estimator``.

    Parameters
    ----------
    data
        SpatialData, AnnData or a list of them, with embeddings in ``obsm[embedding_key]``.
    method
        ``"ridge"``: :class:`~sklearn.preprocessing.StandardScaler`, :class:`~sklearn.decomposition.PCA` to 256
        dims (fewer if there are fewer spots or features), :class:`~sklearn.linear_model.Ridge` with an intercept.
        ``method_kwargs``: ``alpha="cv"`` (default; :class:`~sklearn.model_selection.GridSearchCV` with
        leave-one-section-out folds over the training sections, maximising the mean per-gene Pearson r, over a
        grid relative to the largest eigenvalue of the PCA design; ``alpha_grid=`` the relative grid),
        ``"hest"`` (the HEST-Benchmark probe: ``100 / (n_components * n_genes)``, nearly unregularised) or a
        number; ``n_components=256``.
        ``"knn"``: the mean target of the ``k`` nearest training spots on standardised embeddings
        (:class:`~sklearn.neighbors.KNeighborsRegressor`; BLEEP's inference rule, the Stem paper's ablation);
        ``k=50``, ``metric="cosine"`` or ``"euclidean"``.
        ``"mlp"``: one hidden layer (:class:`~sklearn.neural_network.MLPRegressor`, ReLU, Adam, squared error on
        standardised targets), early-stopped on held-out training data: after every epoch the held-out MSE is
        measured and the network of the best epoch is kept. ``val_section=None`` (a training section to hold out;
        default a random ``validation_fraction=0.15`` of the training spots, all views of a spot together),
        ``hidden=256``, ``alpha=300`` (L2 penalty of :class:`~sklearn.neural_network.MLPRegressor`; strong, as
        the embeddings are wide and the spots few; chosen on validation folds inside C2-C5 from 30/100/300/1000), ``lr=1e-3``, ``batch_size=128``, ``max_epochs=200``,
        ``patience=10``.
    {embedding_key}
    genes
        Gene panel (default ``var['stemst_panel']``).
    sections
        Training sections (a name or a list of names; all if ``None``).
    {transform}
    augment
        Use the 8 flip/rotation views ``obsm[f"{{embedding_key}}_views"]`` as extra training rows with the same
        target.
    {table_key}
    {layer}
    {rng}
        Used by the MLP (initialisation, batches and the random held-out spots).
    {progress}
        Used by the MLP (one step per epoch).
    noise
        Make it probabilistic (:class:`~stemst.tl.NoisyBaseline`): ``"gauss"`` (independent per-gene Gaussian),
        ``"mvn"`` (multivariate Gaussian, Ledoit-Wolf) or ``"resid"`` (resampled residual vectors), fitted on the
        residuals on the held-out training section of the same method fitted without it; the mean is the method
        fitted on all training sections. ``None``: deterministic.
    validation
        With ``noise``, the held-out training section, chosen as :func:`stemst.tl.fit` chooses it (``"auto"``: the
        last training section; spatial blocks of a single section), so both calibrate on the same spots.
    **method_kwargs
        Settings of the method, listed above.

    Returns
    -------
    A deterministic :class:`~stemst.tl.Predictor` (:class:`~stemst.tl.RidgeBaseline`,
    :class:`~stemst.tl.KNNBaseline` or :class:`~stemst.tl.MLPBaseline`) with the fitted pipeline in
    ``.estimator``, or with ``noise`` a :class:`~stemst.tl.NoisyBaseline` around it; run it with
    :func:`stemst.tl.predict` (table ``"<method>_prediction"`` by default).

    Examples
    --------
    >>> ridge = stemst.tl.fit_baseline(sdata, method="ridge", embedding_key="X_color_stats", sections="C2", alpha="hest")
    >>> ridge.estimator  # doctest: +ELLIPSIS
    Pipeline(steps=[('scale', StandardScaler()),
                    ('pca', PCA(n_components=30, svd_solver='full')),
                    ('ridge', Ridge(alpha=0.166...))])
    >>> key = stemst.tl.predict(ridge, sdata, sections="C6", progress=False)
    >>> stemst.tl.evaluate(sdata, pred_key=key).summary["mean_pearson"] > 0.2
    True
    """
    if method not in _FITTERS:
        raise ValueError(f"Unknown baseline {method!r}; choose one of {list(BASELINES)}.")
    retired = [k for k in method_kwargs if method == "mlp" and k in _RETIRED_MLP]
    if retired:
        raise TypeError(
            f"The MLP baseline runs on scikit-learn now and has no {retired} setting; use "
            f"{sorted({_RETIRED_MLP[k] for k in retired})} instead (see stemst.tl.fit_baseline's docstring)."
        )
    ts = training_set(
        data,
        embedding_key=embedding_key,
        genes=genes,
        transform=transform,
        sections=sections,
        views=augment,
        table_key=table_key,
        layer=layer,
    )
    X, Y, groups = ts.X.astype(np.float64), ts.Y.astype(np.float64), ts.sections
    spots = np.arange(len(X))
    if augment:
        v = ts.views.shape[1]
        X = ts.views.reshape(-1, ts.views.shape[2]).astype(np.float64)
        Y, groups, spots = np.repeat(Y, v, axis=0), np.repeat(groups, v), np.repeat(spots, v)
    logger.info("Fitting %s baseline on %d rows x %d features -> %d genes", method, len(X), X.shape[1], Y.shape[1])
    encoder = as_tables(data, table_key)[0].uns.get(UNS_KEY, {}).get("embeddings", {}).get(embedding_key)
    base = {
        "genes": ts.genes,
        "embedding_key": embedding_key,
        "transform": transform,
        "encoder": dict(encoder) if encoder else None,
        "settings": {
            "augment": augment,
            "n_train": int(ts.n_spots),
            "train_sections": ",".join(map(str, np.unique(ts.sections))),
        },
    }

    def fit_rows(rows: np.ndarray) -> Predictor:
        kwargs = dict(method_kwargs)
        if method == "mlp":
            kwargs.update(rng=rng, progress=progress, spots=spots[rows])
        try:
            return _FITTERS[method](X[rows], Y[rows], groups[rows], **kwargs, **base)
        except TypeError as err:
            if "unexpected keyword" in str(err):
                raise TypeError(
                    f"{err}; see stemst.tl.fit_baseline's docstring for the settings of {method!r}."
                ) from None
            raise

    if noise is not None and noise not in NOISE_KINDS:
        raise ValueError(f"Unknown noise {noise!r}; choose one of {list(NOISE_KINDS)} or None.")
    model = fit_rows(np.ones(len(X), dtype=bool))
    if noise is None:
        return model
    spot_groups, held = holdout_groups(ts, validation)
    if held is None:
        raise StemstDataError(
            f"noise={noise!r} needs a held-out training section (or enough spots for spatial blocks) to fit the "
            f"noise on; got {ts.n_spots} spots in {np.unique(ts.sections).tolist()} with validation={validation!r}."
        )
    held_spots = spot_groups == held
    inner = fit_rows(~held_spots[spots])
    residuals = ts.Y[held_spots].astype(np.float64) - inner.predict_mean(ts.X[held_spots])
    logger.info("Noise %r fitted on %d held-out spots of %s", noise, int(held_spots.sum()), held)
    return NoisyBaseline(model, noise=noise, residuals=residuals, held_out=held)

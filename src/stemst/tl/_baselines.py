"""Honest baselines on the same embeddings and targets as the diffusion model: ridge, k-nearest neighbours, MLP.

Each is a :class:`~stemst.tl.Predictor`, so :func:`stemst.tl.predict` serves them and writes the same prediction
table as for the diffusion model, and :func:`stemst.tl.evaluate` scores them the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from stemst._logging import logger
from stemst._schema import TABLE_KEY, UNS_KEY, StemstDataError
from stemst._utils import RNGLike, as_generator
from stemst.metrics import pearson_per_gene
from stemst.tl._base import Predictor
from stemst.tl._data import as_tables, training_set

#: PCA dimension of the HEST-Benchmark ridge probe
HEST_PCA_DIM = 256
#: ``alpha="cv"`` grid, relative to the largest eigenvalue of the training design (Z^T Z)
CV_ALPHA_GRID = tuple(np.logspace(-6, 1, 15))
BASELINES = ("ridge", "knn", "mlp")


class _Standardizer:
    """Per-feature standardisation with the training mean and standard deviation (constant features -> 0)."""

    def __init__(self, X: np.ndarray) -> None:
        self.mean = X.mean(0)
        std = X.std(0)
        self.std = np.where(std > 1e-8, std, 1.0)

    def __call__(self, X: np.ndarray) -> np.ndarray:
        return (np.asarray(X, np.float64) - self.mean) / self.std


class _Baseline(Predictor):
    """A deterministic baseline: ``predict_mean`` maps embeddings to targets; every sample equals it."""

    def __init__(
        self, *, genes: list[str], embedding_key: str, transform: str, encoder: dict | None, settings: dict
    ) -> None:
        super().__init__(genes=genes, embedding_key=embedding_key, transform=transform, encoder=encoder)
        self.settings = dict(settings)

    def predict_mean(self, X: np.ndarray) -> np.ndarray:
        """``(n, n_genes)`` predictions on the model scale."""
        raise NotImplementedError

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


def _pca_basis(Xs: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """Top principal axes ``(d, p)`` and the singular values of the centred ``Xs``."""
    Xc = Xs - Xs.mean(0)
    _, s, vt = np.linalg.svd(Xc, full_matrices=False)
    p = min(n_components, len(s))
    return vt[:p].T, s[:p]


def ridge_path(Z: np.ndarray, Y: np.ndarray, alphas: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Ridge coefficients for several penalties at once, with an unpenalised intercept.

    Solves ``min_w ||Y - b - Z w||^2 + alpha ||w||^2`` for each ``alpha`` through one SVD of the centred ``Z``.

    Returns
    -------
    ``(len(alphas), p, g)`` coefficients and the ``(g,)`` target means; predictions are
    ``(Z_new - Z.mean(0)) @ W[i] + Y.mean(0)``.
    """
    zc = Z - Z.mean(0)
    yc = Y - Y.mean(0)
    u, s, vt = np.linalg.svd(zc, full_matrices=False)
    uty = u.T @ yc
    W = np.stack([vt.T @ ((s / (s**2 + a))[:, None] * uty) for a in alphas])
    return W, Y.mean(0)


class RidgeBaseline(_Baseline):
    """Standardise, project on the top principal components, ridge regression (the HEST-Benchmark linear probe)."""

    method = "ridge"

    def __init__(
        self,
        *,
        scaler: _Standardizer,
        axes: np.ndarray,
        z_mean: np.ndarray,
        coef: np.ndarray,
        y_mean: np.ndarray,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.scaler, self.axes, self.z_mean, self.coef, self.y_mean = scaler, axes, z_mean, coef, y_mean

    def predict_mean(self, X: np.ndarray) -> np.ndarray:
        """Linear prediction from the principal-component scores."""
        z = self.scaler(X) @ self.axes
        return (z - self.z_mean) @ self.coef + self.y_mean


def _ridge_design(X: np.ndarray, n_components: int) -> tuple[_Standardizer, np.ndarray, np.ndarray]:
    scaler = _Standardizer(X)
    Xs = scaler(X)
    axes, _ = _pca_basis(Xs, min(n_components, len(X) - 1, X.shape[1]))
    return scaler, axes, Xs @ axes


def _cv_alpha(
    X: np.ndarray, Y: np.ndarray, groups: np.ndarray, n_components: int, grid: Sequence[float]
) -> tuple[float, dict[str, list[float]]]:
    """Leave-one-section-out choice of the ridge penalty, maximising the mean per-gene Pearson r on held-out sections.

    The grid is relative to the largest eigenvalue of each fold's design, so it adapts to the number of spots.
    """
    folds = np.unique(groups)
    if len(folds) < 2:
        raise StemstDataError(f"alpha='cv' needs at least 2 training sections (leave one out), got {folds.tolist()}.")
    scores = np.zeros((len(folds), len(grid)))
    scale = 0.0
    for i, f in enumerate(folds):
        tr, te = groups != f, groups == f
        scaler, axes, Z = _ridge_design(X[tr], n_components)
        top = float(np.linalg.norm(Z - Z.mean(0), 2) ** 2)
        scale += top / len(folds)
        W, y_mean = ridge_path(Z, Y[tr], [g * top for g in grid])
        zt = scaler(X[te]) @ axes - Z.mean(0)
        for j in range(len(grid)):
            r = pearson_per_gene(zt @ W[j] + y_mean, Y[te])
            scores[i, j] = np.nanmean(r) if np.isfinite(r).any() else -1.0
    mean = scores.mean(0)
    best = int(np.argmax(mean))
    logger.info("Ridge CV over %d sections: best relative alpha %.2g (mean r %.3f)", len(folds), grid[best], mean[best])
    return float(grid[best]), {"relative_alpha": list(map(float, grid)), "mean_pearson": mean.tolist()}


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
    ``Ridge(fit_intercept=False)`` on standardised, PCA-256 embeddings; the centred PCA scores make its fit equal to
    ours, which adds the target mean as intercept). ``alpha="cv"`` picks it by leave-one-section-out CV over
    ``alpha_grid`` (relative to the largest eigenvalue of ``Z^T Z``); a number is used as is.
    """
    scaler, axes, Z = _ridge_design(X, n_components)
    cv = None
    if alpha == "hest":
        value = 100.0 / (Z.shape[1] * Y.shape[1])
    elif alpha == "cv":
        rel, cv = _cv_alpha(X, Y, groups, n_components, alpha_grid)
        value = rel * float(np.linalg.norm(Z - Z.mean(0), 2) ** 2)
    elif isinstance(alpha, int | float) and alpha >= 0:
        value = float(alpha)
    else:
        raise ValueError(f"alpha must be 'cv', 'hest' or a non-negative number, got {alpha!r}.")
    W, y_mean = ridge_path(Z, Y, [value])
    settings = {
        **base.pop("settings"),
        "alpha": value,
        "alpha_rule": alpha if isinstance(alpha, str) else "fixed",
        "n_components": int(Z.shape[1]),
    }
    model = RidgeBaseline(
        scaler=scaler, axes=axes, z_mean=Z.mean(0), coef=W[0], y_mean=y_mean, settings=settings, **base
    )
    model.cv_scores = cv
    return model


# ----------------------------------------------------------------------------------------------------------------
# k nearest neighbours


class KNNBaseline(_Baseline):
    """Mean target of the ``k`` training spots nearest in standardised embedding space (BLEEP's inference rule)."""

    method = "knn"

    def __init__(
        self,
        *,
        scaler: _Standardizer,
        train_X: np.ndarray,
        train_Y: np.ndarray,
        k: int,
        metric: str,
        batch_size: int = 1024,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.scaler, self.k, self.metric, self.batch_size = scaler, k, metric, batch_size
        self.train_X = self._prepare(train_X)
        self.train_Y = np.asarray(train_Y, np.float64)

    def _prepare(self, X: np.ndarray) -> np.ndarray:
        Xs = self.scaler(X)
        if self.metric == "cosine":
            Xs = Xs / np.maximum(np.linalg.norm(Xs, axis=1, keepdims=True), 1e-12)
        return Xs

    def neighbours(self, X: np.ndarray) -> np.ndarray:
        """``(n, k)`` indices of the nearest training spots, nearest first."""
        Q = self._prepare(X)
        out = np.empty((len(Q), self.k), dtype=np.int64)
        sq = (self.train_X**2).sum(1)
        for start in range(0, len(Q), self.batch_size):
            q = Q[start : start + self.batch_size]
            d = sq[None, :] - 2.0 * q @ self.train_X.T  # squared euclidean up to a per-row constant (cosine: 2 - 2cos)
            idx = (
                np.argpartition(d, self.k - 1, axis=1)[:, : self.k]
                if self.k < d.shape[1]
                else np.tile(np.arange(d.shape[1]), (len(q), 1))
            )
            order = np.argsort(np.take_along_axis(d, idx, 1), axis=1, kind="stable")
            out[start : start + len(q)] = np.take_along_axis(idx, order, 1)
        return out

    def predict_mean(self, X: np.ndarray) -> np.ndarray:
        """Average of the neighbours' targets."""
        return self.train_Y[self.neighbours(X)].mean(1)


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
    settings = {**base.pop("settings"), "k": k_used, "metric": metric}
    return KNNBaseline(
        scaler=_Standardizer(X), train_X=X, train_Y=Y, k=k_used, metric=metric, settings=settings, **base
    )


# ----------------------------------------------------------------------------------------------------------------
# MLP


class MLPBaseline(_Baseline):
    """A one-hidden-layer perceptron on standardised embeddings, trained on standardised targets (MSE)."""

    method = "mlp"

    def __init__(
        self,
        *,
        scaler: _Standardizer,
        y_mean: np.ndarray,
        y_std: np.ndarray,
        net: Any,
        history: list[dict],
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.scaler, self.y_mean, self.y_std, self.net, self.history = scaler, y_mean, y_std, net, history

    def predict_mean(self, X: np.ndarray) -> np.ndarray:
        """Network output mapped back to the target scale."""
        import torch

        self.net.eval()
        with torch.inference_mode():
            out = self.net(torch.as_tensor(self.scaler(X), dtype=torch.float32)).numpy()
        return out.astype(np.float64) * self.y_std + self.y_mean


def _train_mlp(
    xt: Any,
    yt: Any,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    gen: np.random.Generator,
    seed: int,
    *,
    hidden: int,
    dropout: float,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    eval_every: int,
    progress: bool,
) -> tuple[Any, list[dict], float]:
    import torch
    from torch import nn
    from tqdm.auto import tqdm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(
            nn.Linear(xt.shape[1], hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, yt.shape[1])
        )
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        history, best, best_state = [], np.inf, None
        for step in tqdm(range(1, steps + 1), desc="mlp", disable=not progress):
            net.train()
            batch = torch.as_tensor(gen.choice(train_idx, size=min(batch_size, len(train_idx)), replace=False))
            loss = nn.functional.mse_loss(net(xt[batch]), yt[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            record = {"step": step, "loss": float(loss.detach())}
            if len(val_idx) and (step % eval_every == 0 or step == steps):
                net.eval()
                with torch.inference_mode():
                    record["val_loss"] = float(nn.functional.mse_loss(net(xt[val_idx]), yt[val_idx]))
                if record["val_loss"] < best:
                    best, best_state = record["val_loss"], {k: v.clone() for k, v in net.state_dict().items()}
                    record["best"] = True
            history.append(record)
        if best_state is not None:
            net.load_state_dict(best_state)
    return net, history, best


def _fit_mlp(
    X: np.ndarray,
    Y: np.ndarray,
    groups: np.ndarray,
    *,
    hidden: int = 256,
    dropout: float = 0.2,
    steps: int = 400,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    val_section: str | None = None,
    eval_every: int = 20,
    rng: RNGLike = 0,
    progress: bool = True,
    **base: Any,
) -> MLPBaseline:
    """Train the MLP with AdamW for ``steps`` steps.

    With ``val_section``, that training section is held out and the weights with the lowest held-out MSE are kept
    (early stopping).
    """
    import torch

    gen = as_generator(rng)
    seed = int(gen.integers(2**31 - 1))
    val = np.zeros(len(X), dtype=bool) if val_section is None else groups == val_section
    if val_section is not None and (not val.any() or val.all()):
        raise StemstDataError(
            f"val_section={val_section!r} must be one of several training sections {np.unique(groups).tolist()}."
        )
    scaler = _Standardizer(X[~val])
    y_mean, y_std = Y[~val].mean(0), Y[~val].std(0)
    y_std = np.where(y_std > 1e-8, y_std, 1.0)
    xt = torch.as_tensor(scaler(X), dtype=torch.float32)
    yt = torch.as_tensor((Y - y_mean) / y_std, dtype=torch.float32)
    train_idx, val_idx = np.flatnonzero(~val), np.flatnonzero(val)
    threads = torch.get_num_threads()
    # the network is tiny: one CPU thread is as fast and avoids oversubscription (10x slower on a busy machine)
    torch.set_num_threads(1)
    try:
        net, history, best = _train_mlp(
            xt,
            yt,
            train_idx,
            val_idx,
            gen,
            seed,
            hidden=hidden,
            dropout=dropout,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            eval_every=eval_every,
            progress=progress,
        )
    finally:
        torch.set_num_threads(threads)
    settings = {
        **base.pop("settings"),
        "hidden": hidden,
        "steps": steps,
        "lr": lr,
        "weight_decay": weight_decay,
        "dropout": dropout,
    }
    if val_section is not None:
        settings.update(val_section=val_section, best_val_loss=float(best))
    return MLPBaseline(scaler=scaler, y_mean=y_mean, y_std=y_std, net=net, history=history, settings=settings, **base)


_FITTERS = {"ridge": _fit_ridge, "knn": _fit_knn, "mlp": _fit_mlp}


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
    **method_kwargs: Any,
) -> Predictor:
    """Fit a baseline on the same embeddings and targets as :func:`stemst.tl.fit`.

    Parameters
    ----------
    data
        SpatialData, AnnData or a list of them, with embeddings in ``obsm[embedding_key]``.
    method
        ``"ridge"``: standardise, PCA to 256 dims (fewer if there are fewer spots or features), ridge regression
        with an intercept. ``method_kwargs``: ``alpha="cv"`` (default; leave-one-section-out CV over the training
        sections, maximising the mean per-gene Pearson r), ``"hest"`` (the HEST-Benchmark setting
        ``100 / (n_components * n_genes)``, nearly unregularised) or a number; ``n_components=256``.
        ``"knn"``: the mean target of the ``k`` nearest training spots on standardised embeddings (BLEEP's
        inference rule, the Stem paper's ablation); ``k=50``, ``metric="cosine"`` or ``"euclidean"``.
        ``"mlp"``: one hidden layer (torch, AdamW, MSE on standardised targets); ``hidden=256``, ``steps=400``,
        ``batch_size=128``, ``lr=1e-3``, ``weight_decay=1e-2``, ``dropout=0.2``, ``val_section=None`` (a training
        section to hold out for early stopping; else a fixed number of steps).
    embedding_key
        ``obsm`` key of the embeddings, e.g. ``"X_efficientnet_lite0"``.
    genes
        Gene panel (default ``var['stemst_panel']``).
    sections
        Training sections (all if ``None``).
    transform
        Target transform (see :func:`stemst.pp.transform_counts`).
    augment
        Use the 8 flip/rotation views ``obsm[f"{embedding_key}_views"]`` as extra training rows with the same target.
    table_key
        Table key for SpatialData inputs.
    layer
        Counts layer (``X`` if ``None``).
    rng
        Seed or generator (MLP initialisation and batches).
    progress
        Show a progress bar (MLP).
    **method_kwargs
        Settings of the method, listed above.

    Returns
    -------
    A deterministic :class:`~stemst.tl.Predictor`; run it with :func:`stemst.tl.predict` (table
    ``"<method>_prediction"`` by default).

    Examples
    --------
    >>> ridge = stemst.tl.fit_baseline(sdata, method="ridge", embedding_key="X_efficientnet_lite0",
    ...                                sections=["C2", "C3", "C4", "C5"])  # doctest: +SKIP
    >>> key = stemst.tl.predict(ridge, sdata, sections="C6")  # doctest: +SKIP
    >>> stemst.tl.evaluate(sdata, pred_key=key).summary["mean_pearson"]  # doctest: +SKIP
    """
    if method not in _FITTERS:
        raise ValueError(f"Unknown baseline {method!r}; choose one of {list(BASELINES)}.")
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
    if augment:
        v = ts.views.shape[1]
        X = ts.views.reshape(-1, ts.views.shape[2]).astype(np.float64)
        Y, groups = np.repeat(Y, v, axis=0), np.repeat(groups, v)
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
    if method == "mlp":
        method_kwargs.update(rng=rng, progress=progress)
    try:
        return _FITTERS[method](X, Y, groups, **method_kwargs, **base)
    except TypeError as err:
        if "unexpected keyword" in str(err):
            raise TypeError(f"{err}; see stemst.tl.fit_baseline's docstring for the settings of {method!r}.") from None
        raise

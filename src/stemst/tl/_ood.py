"""Shift diagnostics: how far each spot's image lies from the training spots', and the sequencing depth.

A model trained on one patient sees a new patient's tissue through the same encoder, but the embeddings can fall
where no training spot lies (another stain, scanner or resolution), and its counts assume the training run's
sequencing depth, which no image shows. :func:`shift_reference` records both at fit time;
:func:`stemst.tl.predict` scores every predicted spot against the reference (:func:`diagnose`) and rescales the
counts to a given depth (:func:`depth_factors`, :func:`rescale`).

The out-of-distribution (OOD) score is computed on the spot's own embedding *before* the per-section
standardisation of the spatial-context features (:func:`stemst.pp.spatial_context` removes each section's mean and
scale, and with them exactly the shift to detect): the squared distance of the standardised embedding from the
subspace of the training spots' top :data:`OOD_PCS` principal components (at most half the features), per
feature, divided by its :data:`OOD_QUANTILE` quantile on the training section :func:`stemst.tl.fit` holds out. So
about 5% of the spots of an unseen section of the training patient score above 1, and a spot above 1 is out of
distribution.
Measured on HER2ST (EfficientNet-Lite0 features, each leave-one-section-out split of C2-C6): the test sections of
patient C 2-13% above 1, section A1 of patient A 68% (``docs/new_patient.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from stemst._errors import warn
from stemst._logging import logger
from stemst._schema import StemstDataError, section_mask, spot_sections
from stemst.tl._data import as_tables, library_size, training_set

#: principal components of the training embeddings that span the reference subspace
OOD_PCS = 16
#: the quantile of the held-out spots' distances that becomes the threshold (score 1)
OOD_QUANTILE = 0.95
#: a section is warned about when more than this share of its spots score above 1
OOD_WARN_FRACTION = 0.5
#: spots scored at a time (their float64 copies: 8,192 x a 1,632-d embedding is 107 MB)
DISTANCE_CHUNK = 8192
#: training spots used for the principal components at most (a random subset beyond)
OOD_MAX_SPOTS = 5000


def _compact(values: np.ndarray) -> list:
    """JSON-ready nested lists at 6 significant digits (the reference is stored in the model's config)."""
    return np.vectorize(lambda v: float(f"{v:.6g}"), otypes=[float])(np.asarray(values, np.float64)).tolist()


@dataclass
class OODReference:
    """The training spots' embedding distribution as the OOD score sees it.

    Attributes
    ----------
    embedding_key
        ``obsm`` key of the embeddings scored (the spot's own embedding, before any per-section standardisation).
    mean, scale
        ``(d,)`` standardisation of the embeddings, from the training spots.
    axes
        ``(d, k)`` top principal axes of the standardised training embeddings.
    threshold
        Distance from the subspace (mean square per feature) that :data:`OOD_QUANTILE` of the calibration spots
        stay below: the score's unit.
    calibrated_on
        What the threshold was calibrated on (the held-out section, or a random half of the training spots).
    """

    embedding_key: str
    mean: np.ndarray
    scale: np.ndarray
    axes: np.ndarray
    threshold: float
    calibrated_on: str

    @classmethod
    def fit(
        cls, X_ref: np.ndarray, X_cal: np.ndarray, *, embedding_key: str, calibrated_on: str, seed: int = 0
    ) -> OODReference:
        """Fit the subspace on ``X_ref`` and the threshold on ``X_cal`` (spots not in ``X_ref``)."""
        X_ref = np.asarray(X_ref, np.float64)
        if len(X_ref) > OOD_MAX_SPOTS:
            X_ref = X_ref[np.random.default_rng(seed).choice(len(X_ref), OOD_MAX_SPOTS, replace=False)]
        mean, sd = X_ref.mean(0), X_ref.std(0)
        scale = np.where(sd > 1e-6, sd, 1.0)
        _, _, vt = np.linalg.svd((X_ref - mean) / scale, full_matrices=False)
        axes = vt[: min(OOD_PCS, X_ref.shape[1] // 2, len(vt))].T  # half the features at least stay off the subspace
        ref = cls(embedding_key, mean, scale, axes, 1.0, calibrated_on)
        ref.threshold = max(float(np.quantile(ref.distance(X_cal), OOD_QUANTILE)), 1e-12)
        return ref

    def distance(self, X: np.ndarray) -> np.ndarray:
        """Mean square per feature of the standardised embeddings off the training subspace, ``(n,)``.

        Computed :data:`DISTANCE_CHUNK` spots at a time, so the float64 copies stay small on a fine grid.
        """
        out = np.empty(len(X), np.float64)
        for start in range(0, len(X), DISTANCE_CHUNK):
            z = (np.asarray(X[start : start + DISTANCE_CHUNK], np.float64) - self.mean) / self.scale
            off = z - (z @ self.axes) @ self.axes.T
            out[start : start + DISTANCE_CHUNK] = (off * off).mean(1)
        return out

    def score(self, X: np.ndarray) -> np.ndarray:
        """Return each spot's OOD score, ``(n,)``: above 1 for about 5% of unseen spots like the training ones."""
        return self.distance(X) / self.threshold

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (stored in the model's ``config.json``)."""
        return {
            "embedding_key": self.embedding_key,
            "mean": _compact(self.mean),
            "scale": _compact(self.scale),
            "axes": _compact(self.axes),
            "threshold": float(self.threshold),
            "quantile": OOD_QUANTILE,
            "calibrated_on": self.calibrated_on,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OODReference:
        """Inverse of :meth:`to_dict`."""
        arrays = {k: np.asarray(d[k], np.float64) for k in ("mean", "scale", "axes")}
        return cls(d["embedding_key"], **arrays, threshold=float(d["threshold"]), calibrated_on=d["calibrated_on"])


def base_embedding_key(encoder: dict[str, Any], embedding_key: str) -> str:
    """Return the embeddings the OOD score reads: the context features' source embedding, else the condition itself."""
    context = (encoder or {}).get("context")
    return (
        str(context["embedding_key"]) if isinstance(context, dict) and context.get("embedding_key") else embedding_key
    )


def shift_reference(
    data: Any,
    table_key: str,
    ts: Any,
    *,
    embedding_key: str,
    encoder: dict[str, Any],
    sections: str | Sequence[str] | None,
    held: np.ndarray | None,
    seed: int = 0,
) -> tuple[dict[str, Any] | None, dict[str, float]]:
    """Return what :func:`stemst.tl.fit` records about its training data for shift diagnostics.

    Parameters
    ----------
    data, table_key, sections
        The training data as passed to :func:`~stemst.tl.fit`.
    ts
        The training set (its spots, in order).
    embedding_key, encoder
        The model's condition and encoder settings (the OOD score reads :func:`base_embedding_key`).
    held
        ``(n_spots,)`` the held-out spots that calibrate the threshold; ``None``: a random half of the spots.
    seed
        Seed of that half and of the subset of spots the principal components use.

    Returns
    -------
    ``(ood, depth)``: the :class:`OODReference` as a dict (``None`` when the embeddings are missing), and
    ``{"median_total_counts": ...}``, the median total count per training spot (over all genes of the table).
    """
    tables = as_tables(data, table_key)
    totals = np.concatenate([library_size(t[section_mask(t, sections)]) for t in tables])
    depth = {"median_total_counts": float(np.median(totals))}
    key = base_embedding_key(encoder, embedding_key)
    try:
        X = training_set(tables, embedding_key=key, genes=ts.genes, sections=sections).X
    except (KeyError, StemstDataError) as err:
        logger.info("No out-of-distribution reference: %s", err)
        return None, depth
    if len(X) != ts.n_spots or len(X) < 4:
        logger.info("No out-of-distribution reference: obsm[%r] does not cover the training spots.", key)
        return None, depth
    if held is None or not held.any():
        held = np.random.default_rng(seed).random(len(X)) < 0.5
        where = "a random half of the training spots (no held-out section)"
    else:
        where = "held-out section(s) " + ", ".join(sorted(set(np.asarray(ts.sections)[held].astype(str).tolist())))
    ref = OODReference.fit(X[~held], X[held], embedding_key=key, calibrated_on=where, seed=seed)
    return ref.to_dict(), depth


def diagnose(model: Any, src: ad.AnnData) -> tuple[np.ndarray, dict[str, dict[str, Any]]] | None:
    """Score every spot of ``src`` against the model's OOD reference; warn about sections mostly out of it.

    Returns
    -------
    ``(scores, summary)``: the ``(n,)`` OOD scores and, per section, ``fraction_ood``, ``median_score``,
    ``n_spots`` and ``warned``; ``None`` (logged) when the model has no reference or ``src`` lacks the embeddings.
    """
    about = getattr(model, "ood", None)
    if not about:
        logger.info(
            "No out-of-distribution score: the %s model has no training reference (a baseline, or saved by an older "
            "stemst); fit it again to have one.",
            model.method,
        )
        return None
    ref = OODReference.from_dict(about)
    if ref.embedding_key not in src.obsm:
        logger.info("No out-of-distribution score: the table lacks obsm[%r].", ref.embedding_key)
        return None
    scores = ref.score(src.obsm[ref.embedding_key]).astype(np.float32)
    sections = spot_sections(src)
    summary = {}
    for s in pd.unique(sections):
        mine = scores[sections == s]
        frac = float((mine > 1).mean())
        summary[str(s)] = {
            "fraction_ood": frac,
            "median_score": float(np.median(mine)),
            "n_spots": len(mine),
            "warned": frac > OOD_WARN_FRACTION,
        }
        if frac > OOD_WARN_FRACTION:
            warn(
                f"Section {s!r}: {frac:.0%} of its spots lie outside the image features of the model's training spots "
                f"(obs['ood_score'] > 1; about 5% of unseen spots like the training ones do): its predictions and their "
                "intervals may not hold. Check the stain and resolution, or measure a few spots and adapt the model "
                "(stemst.tl.adapt).",
                stacklevel=4,
            )
    return scores, summary


def depth_factors(model: Any, src: ad.AnnData, depth: Any) -> np.ndarray | None:
    """Per-spot factors ``(n,)`` on the expected counts for ``depth`` (``None``: the training depth, no change).

    ``depth``: a number (the new run's total counts per spot), one number per spot, or ``"measured"`` (each
    section's median total count per spot in ``src``, which needs its counts).
    """
    if depth is None:
        return None
    ref = (getattr(model, "training", None) or {}).get("depth", {}).get("median_total_counts")
    if not ref:
        raise StemstDataError(
            "depth= needs the training depth, which this model does not record (a baseline, or a model saved by an "
            "older stemst): fit it again, or rescale layers['counts'] yourself."
        )
    if isinstance(depth, str):
        if depth != "measured":
            raise ValueError(f"depth must be a number, one number per spot, 'measured' or None, got {depth!r}.")
        totals = library_size(src) if src.X is not None else np.zeros(src.n_obs)
        if not (totals > 0).any():
            raise StemstDataError("depth='measured' needs the spots' counts, but the table has none (all zero).")
        sections = spot_sections(src)
        values = pd.Series(totals).groupby(sections).transform("median").to_numpy()
    else:
        values = np.broadcast_to(np.asarray(depth, np.float64), (src.n_obs,)) if np.ndim(depth) == 0 else depth
        values = np.asarray(values, np.float64)
        if values.shape != (src.n_obs,):
            raise ValueError(f"depth must be one number or one per predicted spot ({src.n_obs}), got {values.shape}.")
    if not (np.isfinite(values).all() and (values > 0).all()):
        raise ValueError("depth must be positive and finite (total counts per spot).")
    return values / float(ref)


def rescale(values: np.ndarray, factors: np.ndarray, transform: str) -> np.ndarray:
    """Values on the model's scale for counts ``factors`` (per spot, the last-but-one axis) times larger.

    Transforms of the counts alone (``log2p1``) change; library-normalised ones (``log1p_cp10k``) do not.
    """
    from stemst.pp import inverse_transform, transform_counts
    from stemst.pp._transform import get_transform

    if get_transform(transform).needs_library_size:
        return values
    counts = inverse_transform(values, method=transform) * factors[:, None]
    return np.asarray(transform_counts(np.clip(counts, 0, None), method=transform), np.float32)


def expected_counts(
    mean: np.ndarray, factors: np.ndarray | None, reference: float | None, transform: str
) -> np.ndarray:
    """``layers['counts']``: the mean back-transformed, at least 0; for library-normalised transforms, at the depth."""
    from stemst.pp import inverse_transform
    from stemst.pp._transform import get_transform

    lib = None if factors is None or not get_transform(transform).needs_library_size else factors * reference
    return np.clip(inverse_transform(mean, method=transform, library_size=lib), 0, None).astype(np.float32)

"""The interface shared by the diffusion model and the baselines, so :func:`stemst.tl.predict` serves them all."""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np

from stemst._errors import warn
from stemst._schema import UNS_KEY, StemstDataError
from stemst._utils import RNGLike

#: warning when a table's features and the model's training features come from different paths (dense / per patch)
DENSE_MISMATCH = (
    "The table's embeddings were computed {table}, the model's training embeddings {model}: the two differ in the "
    "encoder's deepest stages, so predictions lose a little and the out-of-distribution score flags most spots "
    "(HER2ST validation sections C5 and C2: CRPS +0.008 / +0.012, every spot flagged). Embed the training and the "
    "new sections the same way; for whole-slide maps (stemst.tl.predict_image on a fine grid, embedded densely) "
    "train on stemst.pp.embed_patches(..., dense=True)."
)


def _path(settings: dict) -> str:
    return "densely (dense=True)" if settings.get("dense") else "per patch"


class Predictor:
    """Base class of everything :func:`stemst.tl.predict` can run.

    A predictor maps image embeddings ``(n, d)`` to expression of a fixed gene panel on the scale of a target
    transform, by drawing ``n_samples`` samples per spot (deterministic predictors return identical samples).

    Attributes
    ----------
    genes
        The gene panel, in output order.
    embedding_key
        ``obsm`` key of the embeddings the predictor was trained on, e.g. ``"X_efficientnet_lite0"``.
    transform
        Target transform name (see :func:`stemst.pp.transform_counts`).
    encoder
        Settings of the encoder that produced the embeddings (``uns['stemst']['embeddings'][key]``), if known.
    """

    #: whether :meth:`sample` draws different values per sample
    stochastic: bool = False
    #: short name used in tables and plots
    method: str = "predictor"

    def __init__(
        self, *, genes: list[str], embedding_key: str, transform: str = "log2p1", encoder: dict | None = None
    ) -> None:
        self.genes = list(genes)
        self.embedding_key = embedding_key
        self.transform = transform
        self.encoder = dict(encoder or {})

    @property
    def n_genes(self) -> int:
        """Panel size."""
        return len(self.genes)

    def sample(
        self, X: np.ndarray, *, n_samples: int = 1, rng: RNGLike = None, progress: bool = True, **kwargs: Any
    ) -> np.ndarray:
        """Draw ``n_samples`` predictions per spot.

        Parameters
        ----------
        X
            ``(n, d)`` float32 embeddings.
        n_samples
            Samples per spot.
        rng
            Seed or generator.
        progress
            Show a progress bar.

        Returns
        -------
        ``(n_samples, n, n_genes)`` float32 array on the model scale.
        """
        raise NotImplementedError

    def point_estimate(self, X: np.ndarray, samples: np.ndarray) -> np.ndarray:
        """Return the prediction stored in ``X`` of a prediction table, ``(n, n_genes)``: the mean of the samples."""
        return samples.mean(0)

    def params(self) -> dict[str, Any]:
        """Return the settings worth recording with a prediction."""
        return {"method": self.method, "embedding_key": self.embedding_key, "transform": self.transform}

    def check_table(self, adata: ad.AnnData) -> None:
        """Check that ``adata`` has the embeddings this predictor expects, made by the same encoder."""
        if self.embedding_key not in adata.obsm:
            known = [k for k in adata.obsm if k.startswith("X_")]
            raise KeyError(
                f"The model was trained on obsm[{self.embedding_key!r}], which this table lacks (it has {known}). "
                "Embed the patches with the model's encoder first."
            )
        have = adata.uns.get(UNS_KEY, {}).get("embeddings", {}).get(self.embedding_key)
        if self.encoder and have:
            mine, theirs = self.encoder.get("encoder"), have.get("encoder")
            if mine is not None and theirs is not None and str(mine) != str(theirs):
                raise StemstDataError(
                    f"obsm[{self.embedding_key!r}] was made by encoder {theirs!r}, the model by {mine!r}."
                )
            if bool(self.encoder.get("dense")) != bool(have.get("dense")):
                warn(DENSE_MISMATCH.format(table=_path(have), model=_path(self.encoder)), stacklevel=4)
        width = adata.obsm[self.embedding_key].shape[1]
        expected = getattr(self, "embedding_dim", None)
        if expected is not None and width != expected:
            raise StemstDataError(f"obsm[{self.embedding_key!r}] is {width}-d; the model expects {expected}-d.")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(method={self.method!r}, genes={self.n_genes}, embedding_key={self.embedding_key!r})"
        )

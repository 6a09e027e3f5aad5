"""Probabilistic baselines: a regression's mean plus noise calibrated on a held-out training section.

The cheapest honest competitor of a generative model: if a regression plus a noise model fitted on held-out
residuals scores as well on proper scores (CRPS, energy score, variogram score), the generative model adds nothing
beyond its mean. Each is a :class:`~stemst.tl.Predictor`, so :func:`stemst.tl.predict` samples it and
:func:`stemst.tl.evaluate` scores it with the same code as the diffusion model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stemst._utils import RNGLike, as_generator
from stemst.tl._base import Predictor

#: noise models: independent per-gene Gaussian, multivariate Gaussian (Ledoit-Wolf), resampled residual vectors
NOISE_KINDS = ("gauss", "mvn", "resid")


class NoisyBaseline(Predictor):
    """A deterministic baseline's mean plus noise drawn from a model of its held-out residuals.

    ``noise``:

    - ``"gauss"``: independent per-gene Gaussian, zero mean, standard deviation the root mean square of the
      held-out residuals;
    - ``"mvn"``: multivariate Gaussian, zero mean, the residuals' second-moment matrix shrunk by Ledoit-Wolf
      (:class:`sklearn.covariance.LedoitWolf`), so gene-gene structure is kept;
    - ``"resid"``: whole held-out residual vectors resampled with replacement (keeps their skew, zeros and
      gene-gene structure).

    Samples are clipped at 0, the floor of the target transforms, as the diffusion model's are.

    Attributes
    ----------
    mean_model
        The fitted deterministic baseline (fitted on all training sections) that gives the mean.
    residuals
        ``(n_held_out, n_genes)`` residuals of the same baseline fitted without the held-out section.
    held_out
        The held-out training section (or spatial block) the residuals come from.

    Examples
    --------
    >>> noisy = stemst.tl.fit_baseline(sdata, method="ridge", embedding_key="X_efficientnet_lite0",
    ...                                noise="mvn", sections=["C2", "C3", "C4", "C5"])  # doctest: +SKIP
    >>> key = stemst.tl.predict(noisy, sdata, sections="C6", n_samples=20)  # doctest: +SKIP
    >>> stemst.tl.predict(noisy.with_noise("resid"), sdata, sections="C6")  # doctest: +SKIP
    """

    stochastic = True

    def __init__(self, mean_model: Any, *, noise: str, residuals: np.ndarray, held_out: str) -> None:
        if noise not in NOISE_KINDS:
            raise ValueError(f"Unknown noise {noise!r}; choose one of {list(NOISE_KINDS)}.")
        residuals = np.asarray(residuals, dtype=np.float64)
        if residuals.ndim != 2 or residuals.shape[1] != mean_model.n_genes or len(residuals) < 2:
            raise ValueError(
                f"residuals must be (n >= 2, {mean_model.n_genes}) held-out residuals, got {residuals.shape}."
            )
        super().__init__(
            genes=mean_model.genes,
            embedding_key=mean_model.embedding_key,
            transform=mean_model.transform,
            encoder=mean_model.encoder,
        )
        self.mean_model, self.noise, self.residuals, self.held_out = mean_model, noise, residuals, str(held_out)
        self.method = f"{mean_model.method}+{noise}"
        self._factor = self._noise_factor()

    def _noise_factor(self) -> np.ndarray | None:
        if self.noise == "gauss":
            return np.sqrt((self.residuals**2).mean(0))
        if self.noise == "mvn":
            from sklearn.covariance import LedoitWolf

            cov = LedoitWolf(assume_centered=True).fit(self.residuals).covariance_
            return np.linalg.cholesky(cov + 1e-9 * np.eye(len(cov)))
        return None

    @property
    def embedding_dim(self) -> int | None:
        """Width of the embeddings of the mean model."""
        return getattr(self.mean_model, "embedding_dim", None)

    def with_noise(self, noise: str) -> NoisyBaseline:
        """Return the same mean and residuals with another noise model (no refitting)."""
        return NoisyBaseline(self.mean_model, noise=noise, residuals=self.residuals, held_out=self.held_out)

    def predict_mean(self, X: np.ndarray) -> np.ndarray:
        """``(n, n_genes)`` mean on the model scale (the noise has zero mean, except ``"resid"``'s residual bias)."""
        return self.mean_model.predict_mean(X)

    def point_estimate(self, X: np.ndarray, samples: np.ndarray | None) -> np.ndarray:
        """Return the mean model's prediction, clipped at 0: what the samples are drawn around (no Monte Carlo noise).

        The diffusion model's prediction is its model mean too, so both are scored on the same footing.
        """
        return np.maximum(self.predict_mean(np.asarray(X, np.float32)), 0.0)

    def noise_draws(self, shape: tuple[int, int], rng: RNGLike = None) -> np.ndarray:
        """Return ``(*shape, n_genes)`` draws of the noise model (before the mean is added and the floor applied)."""
        gen = as_generator(rng)
        if self.noise == "gauss":
            return gen.standard_normal((*shape, self.n_genes)) * self._factor
        if self.noise == "mvn":
            return gen.standard_normal((*shape, self.n_genes)) @ self._factor.T
        return self.residuals[gen.integers(len(self.residuals), size=shape)]

    def sample(
        self, X: np.ndarray, *, n_samples: int = 1, rng: RNGLike = None, progress: bool = True, **kwargs: Any
    ) -> np.ndarray:
        """Return ``(n_samples, n, n_genes)`` float32: the mean plus :meth:`noise_draws`, clipped at 0.

        0 is the floor of both target transforms; the diffusion model's samples are clipped there too.
        """
        mean = self.predict_mean(np.asarray(X, np.float32))
        return np.maximum(mean + self.noise_draws((n_samples, len(mean)), rng), 0.0).astype(np.float32)

    def params(self) -> dict[str, Any]:
        """Return the mean model's settings, the noise model and the held-out section."""
        return {**self.mean_model.params(), "method": self.method, "noise": self.noise, "held_out": self.held_out}

    def __repr__(self) -> str:
        return f"NoisyBaseline({self.mean_model!r}, noise={self.noise!r}, held_out={self.held_out!r})"

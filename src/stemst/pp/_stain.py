"""H&E stain vectors: Macenko estimation and normalisation to a reference, and HED stain jitter."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from stemst._schema import StemstDataError

#: transmitted light intensity: the brightness of glass, where the optical density is zero
LIGHT = 240.0
#: a pixel is tissue when its optical density is at least this in every channel (Macenko's beta)
OD_TISSUE = 0.15
#: percentile of the angle in the stain plane taken as the two extreme stain directions (Macenko's alpha)
ANGLE_PERCENTILE = 1.0
#: percentile of a stain's concentration taken as its maximum
MAX_PERCENTILE = 99.0
#: fewest tissue pixels a stain estimate accepts
MIN_TISSUE_PX = 500
#: spots whose patches are read to estimate a section's stains (spread evenly over the section)
STAIN_SPOTS = 64
#: HED jitter (Tellez et al. 2018, "HED-light"): each stain channel scaled by U(1 - s, 1 + s) and shifted by U(-b, b)
JITTER_SCALE = 0.05
JITTER_BIAS = 0.05


@dataclass(frozen=True)
class Stains:
    """The stain vectors of a slide: unit optical-density vectors of haematoxylin and eosin, and their maxima."""

    vectors: np.ndarray  #: (3, 2): column 0 haematoxylin, column 1 eosin, in RGB optical density
    max_concentration: np.ndarray  #: (2,): 99th percentile of each stain's concentration over the tissue

    def to_dict(self) -> dict[str, list]:
        """JSON-ready form, as recorded in the table's ``uns`` and in a model's encoder settings."""
        return {"vectors": self.vectors.tolist(), "max_concentration": self.max_concentration.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, what: str = "stain_norm") -> Stains:
        """Read :meth:`to_dict`'s form back, checking shapes and values."""
        try:
            vectors = np.asarray(d["vectors"], dtype=np.float64)
            peak = np.asarray(d["max_concentration"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as e:
            raise StemstDataError(
                f"{what} must hold 'vectors' (3 x 2) and 'max_concentration' (2 values), as recorded by "
                f"stemst.pp.embed_patches(..., stain_norm=True) in uns['stemst']['embeddings'][key]['stain_norm']"
                f"['reference']; got {type(d).__name__} ({e})."
            ) from e
        if vectors.shape != (3, 2) or peak.shape != (2,) or not (np.isfinite(vectors).all() and (peak > 0).all()):
            raise StemstDataError(
                f"{what}: 'vectors' must be 3 x 2 and finite, 'max_concentration' 2 positive values; got shapes "
                f"{vectors.shape} and {peak.shape}."
            )
        return cls(vectors, peak)


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Optical density ``-ln((I + 1) / LIGHT)`` of 8-bit RGB values ``(..., 3)``."""
    return -np.log((rgb.astype(np.float64) + 1.0) / LIGHT)


def fit_stains(rgb: np.ndarray, *, what: str = "the image") -> Stains:
    """Estimate the haematoxylin and eosin vectors of 8-bit RGB pixels ``(..., 3)`` with Macenko's method.

    The optical densities of the tissue pixels are projected on the plane of their two main principal directions;
    the directions at the 1st and 99th percentile of the angle in that plane are the two stains, haematoxylin the
    one with the larger red optical density. Reference: M. Macenko et al., "A method for normalizing histology
    slides for quantitative analysis", ISBI 2009, doi:10.1109/ISBI.2009.5193250.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> h, e = np.array([0.56, 0.72, 0.41]), np.array([0.22, 0.80, 0.56])
    >>> conc = rng.uniform(0.5, 1.5, size=(3000, 2))
    >>> conc[:500, 1], conc[500:1000, 0] = 0, 0  # some pixels hold one stain only
    >>> rgb = np.clip(LIGHT * np.exp(-(conc @ np.stack([h, e]))) - 1, 0, 255)
    >>> np.round(fit_stains(rgb).vectors.T, 2)  # doctest: +NORMALIZE_WHITESPACE
    array([[0.56, 0.72, 0.41],
           [0.22, 0.8 , 0.56]])
    """
    od = optical_density(np.reshape(rgb, (-1, 3)))
    tissue = od[(od >= OD_TISSUE).all(axis=1)]
    if len(tissue) < MIN_TISSUE_PX:
        raise StemstDataError(
            f"{what}: only {len(tissue)} tissue pixels (optical density >= {OD_TISSUE} in every channel), at least "
            f"{MIN_TISSUE_PX} are needed to estimate the stain vectors. Check that the spots lie on stained tissue."
        )
    _, eigvecs = np.linalg.eigh(np.cov(tissue.T))
    plane = eigvecs[:, 1:3] * np.sign(eigvecs[:, 1:3].sum(0))  # the two largest, pointing into positive density
    proj = tissue @ plane
    angle = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(angle, [ANGLE_PERCENTILE, 100 - ANGLE_PERCENTILE])
    ends = plane @ np.array([[np.cos(lo), np.cos(hi)], [np.sin(lo), np.sin(hi)]])
    ends = ends / np.linalg.norm(ends, axis=0)
    vectors = ends if ends[0, 0] >= ends[0, 1] else ends[:, ::-1]
    conc = np.linalg.lstsq(vectors, tissue.T, rcond=None)[0]
    return Stains(vectors, np.percentile(conc, MAX_PERCENTILE, axis=1))


def normalise_stains(patches: np.ndarray, source: Stains, reference: Stains) -> np.ndarray:
    """Re-stain ``(n, 3, y, x)`` uint8 patches from a slide's ``source`` stains to the ``reference`` stains.

    Each pixel's optical density is unmixed into haematoxylin and eosin concentrations with the source vectors,
    scaled so that the source's maximum concentrations match the reference's, and mixed again with the reference
    vectors (Macenko et al. 2009); what lies outside the stain plane is dropped, so glass becomes ``LIGHT``.
    """
    rgb = np.moveaxis(patches, 1, -1)
    conc = optical_density(rgb) @ np.linalg.pinv(source.vectors).T
    conc *= reference.max_concentration / source.max_concentration
    out = LIGHT * np.exp(-(conc @ reference.vectors.T))
    return np.moveaxis(np.clip(np.rint(out), 0, 255).astype(np.uint8), -1, 1)


def hed_jitter(patches: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Stain-jittered copies of ``(n, 3, y, x)`` uint8 patches: each patch's HED channels scaled and shifted at random.

    Each channel ``c`` of a patch's colour deconvolution (:func:`hed_rescale`) becomes
    ``c * U(1 - JITTER_SCALE, 1 + JITTER_SCALE) + U(-JITTER_BIAS, JITTER_BIAS)``, the "HED-light" augmentation of
    D. Tellez et al., "Whole-slide mitosis detection in H&E breast histology using PHH3 as a reference to train
    distilled stain-invariant convolutional networks", IEEE TMI 2018.
    """
    n = len(patches)
    scale = rng.uniform(1 - JITTER_SCALE, 1 + JITTER_SCALE, size=(n, 1, 1, 3))
    bias = rng.uniform(-JITTER_BIAS, JITTER_BIAS, size=(n, 1, 1, 3))
    return hed_rescale(patches, scale, bias)


def hed_rescale(patches: np.ndarray, scale: Any, bias: Any = 0.0) -> np.ndarray:
    """Map the HED channels of ``(n, 3, y, x)`` uint8 patches to ``hed * scale + bias`` (broadcast on ``(n, y, x, 3)``).

    Colour deconvolution of the optical density ``-ln((I + 1) / 256)`` with Ruifrok and Johnston's haematoxylin,
    eosin and DAB matrix (:data:`skimage.color.hed_from_rgb`), without clipping, so that ``scale=1, bias=0`` gives
    the patches back.

    Examples
    --------
    >>> patch = np.full((1, 3, 2, 2), 200, dtype=np.uint8)
    >>> hed_rescale(patch, 1.0)[0, :, 0, 0]
    array([200, 200, 200], dtype=uint8)
    >>> hed_rescale(patch, [2.0, 1.0, 1.0])[0, :, 0, 0]  # twice the haematoxylin: darker, bluer
    array([165, 163, 184], dtype=uint8)
    """
    from skimage.color import hed_from_rgb, rgb_from_hed

    od = -np.log((np.moveaxis(patches, 1, -1).astype(np.float64) + 1.0) / 256.0)
    hed = (od @ hed_from_rgb) * scale + bias
    rgb = 256.0 * np.exp(-(hed @ rgb_from_hed)) - 1.0
    return np.moveaxis(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), -1, 1)

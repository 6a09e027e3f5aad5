"""The one place that knows how stemst lays out spatial transcriptomics data in a :class:`~spatialdata.SpatialData`.

Every reader (:mod:`stemst.datasets`, :mod:`stemst.io`) builds its object through :func:`make_section` and
:func:`assemble`, and every consumer finds elements through the accessors here, so the keys live in one module.

Layout, per section ``s`` (documented on the "Data model" docs page):

- ``images[f"{s}_he"]``: the H&E image, ``(c, y, x)`` uint8 RGB, multiscale for large images, in coordinate system ``s``.
- ``shapes[f"{s}_spots"]``: circles at the spot centres in image pixels, column ``radius`` in pixels, indexed by spot id.
- ``tables["table"]``: one table of raw integer counts (CSR) for all sections, annotating the circles through
  ``obs["region"]`` (the shapes element) and ``obs["spot_id"]`` (the circle's index); ``obs["section"]``;
  ``obsm["spatial"]`` the spot centre ``(x, y)`` in image pixels; ``uns["stemst"]["sections"][s]`` the section's
  metadata (µm per pixel, spot diameter, source).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from stemst._errors import StemstDataError

TABLE_KEY = "table"
REGION_KEY = "region"
INSTANCE_KEY = "spot_id"
SECTION_KEY = "section"
SPATIAL_KEY = "spatial"
UNS_KEY = "stemst"
PANEL_KEY = "stemst_panel"
PREDICTION_KEY = "stemst_prediction"
N_SECTIONS_KEY = "n_sections"
#: prediction table ``obs``: each spot's out-of-distribution score (1 = the threshold) and whether it exceeds it
OOD_SCORE_KEY = "ood_score"
OOD_KEY = "ood"
#: prediction table ``uns``: the per-section out-of-distribution summary
OOD_UNS_KEY = "stemst_ood"
#: prediction table ``obs``: the spots an adapted model was adapted on (measured; :func:`stemst.tl.evaluate` skips them)
MEASURED_KEY = "adapt_measured"
#: what the data model keeps in the counts table, by attribute: no function's ``key_added`` may replace these
RESERVED_KEYS: dict[str, dict[str, str]] = {
    "obs": {SECTION_KEY: "the spots' sections", REGION_KEY: "the spots' circles", INSTANCE_KEY: "the spot ids"},
    "obsm": {SPATIAL_KEY: "the spot centres"},
    "var": {N_SECTIONS_KEY: "in how many sections each gene was measured"},
    "uns": {UNS_KEY: "the sections' metadata", "spatialdata_attrs": "what the table annotates"},
}
#: images whose longest side exceeds this are stored as a pyramid (factor 2 per level)
MULTISCALE_THRESHOLD = 4096
IMAGE_CHUNKS = 1024


def image_key(section: str) -> str:
    """Name of the H&E image element of ``section``."""
    return f"{section}_he"


def spots_key(section: str) -> str:
    """Name of the spot circles element of ``section``."""
    return f"{section}_spots"


def embedding_key(encoder: str) -> str:
    """``obsm`` key of the per-spot embedding made by ``encoder``."""
    return f"X_{encoder}"


def views_key(encoder: str) -> str:
    """``obsm`` key of the ``(n_spots, 8, dim)`` embeddings of the 8 flips/rotations of each patch."""
    return f"X_{encoder}_views"


def context_key(embedding_key: str) -> str:
    """``obsm`` key of the spatial-context features (own + neighbour rings) of ``embedding_key``."""
    return f"{embedding_key}_context"


def ring_key(embedding_key: str, ring: int) -> str:
    """``obsm`` key of the mean embedding of each spot's ring-``ring`` neighbours."""
    return f"{embedding_key}_ring{ring}"


@dataclass(frozen=True)
class SectionInfo:
    """Metadata of one section.

    Attributes
    ----------
    section
        Section name, also its coordinate system.
    microns_per_pixel
        Physical pixel size of the stored image (full resolution level).
    spot_diameter_um
        Physical spot diameter.
    source
        Where the data came from (free text, e.g. a URL or a path).
    """

    section: str
    microns_per_pixel: float
    spot_diameter_um: float
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def spot_diameter_px(self) -> float:
        """Spot diameter in image pixels."""
        return self.spot_diameter_um / self.microns_per_pixel

    @property
    def image_key(self) -> str:
        """Key of the image element."""
        return image_key(self.section)

    @property
    def spots_key(self) -> str:
        """Key of the circles element."""
        return spots_key(self.section)

    def to_dict(self) -> dict[str, Any]:
        """Return the serialisable form stored in ``table.uns["stemst"]["sections"]``."""
        d = asdict(self)
        d["spot_diameter_px"] = self.spot_diameter_px
        d["image_key"] = self.image_key
        d["spots_key"] = self.spots_key
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SectionInfo:
        """Inverse of :meth:`to_dict`."""
        return cls(
            section=str(d["section"]),
            microns_per_pixel=float(d["microns_per_pixel"]),
            spot_diameter_um=float(d["spot_diameter_um"]),
            source=str(d.get("source", "")),
            extra=dict(d.get("extra", {}) or {}),
        )


@dataclass
class Section:
    """A validated section, ready to be assembled into a :class:`~spatialdata.SpatialData` by :func:`assemble`."""

    info: SectionInfo
    image: Any  # (c, y, x) uint8 numpy or dask array
    counts: sp.csr_matrix
    genes: pd.Index
    spot_ids: pd.Index
    coords: np.ndarray  # (n, 2) x, y in image pixels
    obs: pd.DataFrame


def _as_chw(image: Any, section: str) -> Any:
    if image.ndim != 3:
        raise StemstDataError(
            f"Section {section!r}: the image must be 3-D (y, x, 3) or (3, y, x), got shape {image.shape}."
        )
    if image.shape[-1] in (3, 4) and image.shape[0] not in (3, 4):
        image = image.transpose(2, 0, 1)
    if image.shape[0] == 4:
        image = image[:3]
    if image.shape[0] != 3:
        raise StemstDataError(f"Section {section!r}: expected an RGB image, got shape {image.shape}.")
    if image.dtype != np.uint8:
        raise StemstDataError(f"Section {section!r}: expected a uint8 RGB image, got dtype {image.dtype}.")
    return image


def _as_counts(counts: Any, section: str) -> sp.csr_matrix:
    if isinstance(counts, pd.DataFrame):
        counts = counts.to_numpy()
    m = sp.csr_matrix(counts)
    if m.nnz and not np.all(np.isfinite(m.data)):
        raise StemstDataError(f"Section {section!r}: counts contain NaN or infinite values.")
    if m.nnz and np.any(m.data < 0):
        raise StemstDataError(f"Section {section!r}: counts contain negative values; stemst needs raw UMI counts.")
    if m.nnz and not np.all(np.mod(m.data, 1) == 0):
        raise StemstDataError(
            f"Section {section!r}: counts are not integers (e.g. {m.data[np.mod(m.data, 1) != 0][0]!r}); "
            "stemst needs raw counts, not normalised or log-transformed values."
        )
    m = m.astype(np.int32)
    m.eliminate_zeros()
    return m


def make_section(
    section: str,
    *,
    image: Any,
    counts: Any,
    genes: Sequence[str],
    spot_ids: Sequence[str],
    coords: np.ndarray,
    microns_per_pixel: float,
    spot_diameter_um: float,
    source: str = "",
    obs: pd.DataFrame | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Section:
    """Validate one section's pieces and bundle them.

    Parameters
    ----------
    section
        Section name; becomes the coordinate system and the prefix of the element keys.
    image
        RGB uint8 image, ``(y, x, 3)`` or ``(3, y, x)``, numpy or dask.
    counts
        Raw integer counts, spots x genes (dense, sparse or a DataFrame).
    genes
        Gene names, one per column of ``counts``.
    spot_ids
        Unique spot identifiers, one per row of ``counts``.
    coords
        Spot centres ``(x, y)`` in pixels of ``image``.
    microns_per_pixel
        Physical pixel size of ``image``.
    spot_diameter_um
        Physical spot diameter.
    source
        Provenance, stored in the metadata.
    obs
        Extra per-spot annotations (same row order as ``counts``).
    extra
        Extra metadata to store with the section.

    Returns
    -------
    A :class:`Section` to pass to :func:`assemble`.

    Raises
    ------
    StemstDataError
        On duplicate spot ids or genes, mismatched lengths, spots outside the image, non-integer or negative
        counts, or a non-positive pixel size.
    """
    image = _as_chw(image, section)
    counts = _as_counts(counts, section)
    genes = pd.Index([str(g) for g in genes])
    spot_ids = pd.Index([str(s) for s in spot_ids])
    coords = np.asarray(coords, dtype=np.float64)
    n = counts.shape[0]
    if n == 0:
        raise StemstDataError(f"Section {section!r} has no spots.")
    if counts.shape[1] != len(genes):
        raise StemstDataError(f"Section {section!r}: {counts.shape[1]} count columns but {len(genes)} gene names.")
    if len(spot_ids) != n or coords.shape != (n, 2):
        raise StemstDataError(
            f"Section {section!r}: {n} rows of counts, {len(spot_ids)} spot ids and coordinates of shape "
            f"{coords.shape}; they must agree (n, n, (n, 2))."
        )
    if spot_ids.has_duplicates:
        dup = spot_ids[spot_ids.duplicated()].unique()[:5].tolist()
        raise StemstDataError(f"Section {section!r}: duplicate spot ids, e.g. {dup}.")
    if genes.has_duplicates:
        dup = genes[genes.duplicated()].unique()[:5].tolist()
        raise StemstDataError(f"Section {section!r}: duplicate gene names, e.g. {dup}.")
    if not np.all(np.isfinite(coords)):
        raise StemstDataError(f"Section {section!r}: spot coordinates contain NaN or infinite values.")
    h, w = int(image.shape[1]), int(image.shape[2])
    outside = (coords[:, 0] < 0) | (coords[:, 0] >= w) | (coords[:, 1] < 0) | (coords[:, 1] >= h)
    if outside.any():
        bad = spot_ids[outside][:5].tolist()
        raise StemstDataError(
            f"Section {section!r}: {int(outside.sum())} spot centres fall outside the {w} x {h} px image, e.g. {bad}. "
            "Are the coordinates at the image's resolution (check the scale factor)?"
        )
    if not (np.isfinite(microns_per_pixel) and microns_per_pixel > 0):
        raise StemstDataError(f"Section {section!r}: microns_per_pixel must be positive, got {microns_per_pixel}.")
    if not (np.isfinite(spot_diameter_um) and spot_diameter_um > 0):
        raise StemstDataError(f"Section {section!r}: spot_diameter_um must be positive, got {spot_diameter_um}.")
    obs = pd.DataFrame(index=spot_ids) if obs is None else obs.copy()
    if len(obs) != n:
        raise StemstDataError(f"Section {section!r}: obs has {len(obs)} rows, counts {n}.")
    obs.index = spot_ids
    info = SectionInfo(section, float(microns_per_pixel), float(spot_diameter_um), source, dict(extra or {}))
    return Section(info, image, counts, genes, spot_ids, coords, obs)


def _union_counts(sections: Sequence[Section]) -> tuple[sp.csr_matrix, pd.Index]:
    genes = sections[0].genes
    for s in sections[1:]:
        genes = genes.union(s.genes, sort=False)
    blocks = []
    for s in sections:
        idx = genes.get_indexer(s.genes)
        m = s.counts.tocoo()
        blocks.append(sp.csr_matrix((m.data, (m.row, idx[m.col])), shape=(m.shape[0], len(genes)), dtype=np.int32))
    return sp.vstack(blocks, format="csr"), genes


def assemble(sections: Sequence[Section]) -> Any:
    """Build the :class:`~spatialdata.SpatialData` of the stemst data model from validated sections.

    Genes are the union over sections; a gene absent from a section's file counts as zero there
    (``var['n_sections']`` says in how many sections each gene was measured).

    Parameters
    ----------
    sections
        Output of :func:`make_section`, with distinct section names.

    Returns
    -------
    :class:`~spatialdata.SpatialData` with one image and one circles element per section and one table.
    """
    import spatialdata as sd
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity

    if not sections:
        raise StemstDataError("No sections to assemble.")
    names = [s.info.section for s in sections]
    if len(set(names)) != len(names):
        raise StemstDataError(f"Section names must be unique, got {names}.")
    images, shapes, obs_frames, coords = {}, {}, [], []
    for s in sections:
        cs = {s.info.section: Identity()}
        longest = max(s.image.shape[1:])
        scale_factors = []
        while longest / 2 ** len(scale_factors) > MULTISCALE_THRESHOLD:
            scale_factors.append(2)
        images[s.info.image_key] = Image2DModel.parse(
            s.image,
            dims=("c", "y", "x"),
            c_coords=["r", "g", "b"],
            transformations=cs,
            scale_factors=scale_factors or None,
            chunks=(3, IMAGE_CHUNKS, IMAGE_CHUNKS),
        )
        radius = np.full(len(s.spot_ids), s.info.spot_diameter_px / 2.0)
        shapes[s.info.spots_key] = ShapesModel.parse(
            s.coords, geometry=0, radius=radius, index=s.spot_ids.copy(), transformations=cs
        )
        obs = s.obs.copy()
        obs[SECTION_KEY] = s.info.section
        obs[REGION_KEY] = s.info.spots_key
        obs[INSTANCE_KEY] = s.spot_ids.to_numpy()
        obs.index = [f"{s.info.section}_{i}" for i in s.spot_ids]
        obs_frames.append(obs)
        coords.append(s.coords)
    counts, genes = _union_counts(sections)
    obs = pd.concat(obs_frames)
    obs[SECTION_KEY] = pd.Categorical(obs[SECTION_KEY], categories=names)
    obs[REGION_KEY] = pd.Categorical(obs[REGION_KEY], categories=[s.info.spots_key for s in sections])
    var = pd.DataFrame(index=genes)
    var["n_sections"] = np.sum([genes.isin(s.genes) for s in sections], axis=0).astype(np.int32)
    adata = ad.AnnData(X=counts, obs=obs, var=var)
    adata.obsm[SPATIAL_KEY] = np.concatenate(coords).astype(np.float64)
    adata.uns[UNS_KEY] = {"sections": {s.info.section: s.info.to_dict() for s in sections}}
    table = TableModel.parse(
        adata, region=[s.info.spots_key for s in sections], region_key=REGION_KEY, instance_key=INSTANCE_KEY
    )
    return sd.SpatialData(images=images, shapes=shapes, tables={TABLE_KEY: table})


# ----------------------------------------------------------------------------------------------------------------
# accessors


def get_table(sdata: Any, table_key: str = TABLE_KEY) -> ad.AnnData:
    """Return the counts table of ``sdata`` (a :class:`~spatialdata.SpatialData` or an :class:`~anndata.AnnData`)."""
    if isinstance(sdata, ad.AnnData):
        return sdata
    if table_key not in sdata.tables:
        raise KeyError(f"No table {table_key!r} in the SpatialData; tables present: {list(sdata.tables.keys())}.")
    return sdata.tables[table_key]


def sections(adata: ad.AnnData) -> list[str]:
    """Section names of a stemst table, in the order of its spots (then any section without spots, sorted).

    The order is the same in every process that reads the same table: the keys of ``uns`` read back from a zarr
    store are not ordered reliably, the rows are.
    """
    info = adata.uns.get(UNS_KEY, {}).get("sections")
    if SECTION_KEY in adata.obs:
        seen = [str(c) for c in pd.unique(adata.obs[SECTION_KEY].astype(str))]
        return seen if info is None else seen + sorted(str(k) for k in info if str(k) not in seen)
    if info is None:
        raise StemstDataError(
            f"The table has no uns[{UNS_KEY!r}]['sections'] and no obs[{SECTION_KEY!r}]; "
            "load data with stemst.datasets or stemst.io."
        )
    return sorted(str(k) for k in info)


def spot_sections(adata: ad.AnnData) -> np.ndarray:
    """Each spot's section name as a string array; ``""`` for every spot of a table without ``obs['section']``.

    Examples
    --------
    >>> spot_sections(ad.AnnData(obs=pd.DataFrame({"section": ["A", "B"]}, index=["a", "b"]))).tolist()
    ['A', 'B']
    """
    if SECTION_KEY not in adata.obs:
        return np.full(adata.n_obs, "")
    return adata.obs[SECTION_KEY].astype(str).to_numpy()


def section_info(adata: ad.AnnData, section: str) -> SectionInfo:
    """Metadata of ``section`` stored in the table."""
    info = adata.uns.get(UNS_KEY, {}).get("sections", {})
    if section not in info:
        raise StemstDataError(f"Unknown section {section!r}; the table has sections {list(info)}.")
    return SectionInfo.from_dict(info[section])


def section_mask(adata: ad.AnnData, sections_: str | Iterable[str] | None) -> np.ndarray:
    """Boolean mask of the spots in ``sections_`` (all spots if ``None``)."""
    if sections_ is None:
        return np.ones(adata.n_obs, dtype=bool)
    wanted = [sections_] if isinstance(sections_, str) else list(sections_)
    known = set(sections(adata))
    missing = [s for s in wanted if s not in known]
    if missing:
        raise StemstDataError(f"Unknown sections {missing}; the table has {sorted(known)}.")
    return adata.obs[SECTION_KEY].isin(wanted).to_numpy()


def get_image(sdata: Any, section: str, scale: int = 0) -> Any:
    """Return section ``section``'s H&E image as a lazy ``(c, y, x)`` dask array at pyramid level ``scale``."""
    key = image_key(section)
    if key not in sdata.images:
        raise StemstDataError(
            f"No image element {key!r} for section {section!r}; images present: {list(sdata.images.keys())}."
        )
    el = sdata.images[key]
    if hasattr(el, "children") and len(el.children):  # multiscale DataTree
        levels = sorted(el.children)
        level = levels[min(scale, len(levels) - 1)]
        arr = next(iter(el[level].data_vars.values()))
    else:
        arr = el
    return arr.data


# ----------------------------------------------------------------------------------------------------------------
# checks shared by the functions that read embeddings or write tables


def check_table_key_free(sdata: Any, key: str, *, overwrite: bool = False, counts_key: str = TABLE_KEY) -> None:
    """Refuse to write a table under ``key`` when that would replace data the user did not ask to replace.

    Call it before computing anything, so that a refusal leaves ``sdata`` as it was.

    Parameters
    ----------
    sdata
        The :class:`~spatialdata.SpatialData` about to receive a table.
    key
        Key of the new table.
    overwrite
        Allow replacing an existing table other than the counts table.
    counts_key
        Key of the counts table, which is never replaced.

    Raises
    ------
    StemstDataError
        If ``key`` is the counts table, or names an existing table and ``overwrite`` is False.

    Examples
    --------
    >>> import anndata as ad, spatialdata as sd
    >>> sdata = sd.SpatialData(tables={"table": ad.AnnData()})
    >>> check_table_key_free(sdata, "prediction")
    """
    import re

    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", key):
        raise StemstDataError(
            f"key_added={key!r} is not a valid SpatialData name: use only letters, digits, '_', '.' and '-'."
        )
    if key == counts_key:
        raise StemstDataError(
            f"key_added={key!r} is the counts table; writing there would destroy the raw counts. "
            "Choose another key, e.g. key_added='prediction'."
        )
    if key in sdata.tables and not overwrite:
        raise StemstDataError(
            f"A table {key!r} already exists; pass overwrite=True to replace it, or choose another key_added. "
            f"Tables present: {list(sdata.tables.keys())}."
        )


def check_key_free(
    adata: ad.AnnData, where: str, key: str, *, owned: Iterable[str] = (), argument: str = "key_added"
) -> None:
    """Refuse to write ``adata.<where>[key]`` when that would replace data the writing function does not own.

    Call it before computing anything, so that a refusal leaves ``adata`` as it was.

    Parameters
    ----------
    adata
        The table about to be written to.
    where
        ``"obs"``, ``"obsm"``, ``"var"`` or ``"uns"``.
    key
        The key (or column) to be written.
    owned
        Keys the function wrote itself earlier and may replace.
    argument
        The argument that named ``key``, for the message.

    Raises
    ------
    StemstDataError
        If ``key`` is reserved by the data model (:data:`RESERVED_KEYS`), or exists and is not in ``owned``.

    Examples
    --------
    >>> check_key_free(ad.AnnData(np.zeros((2, 1))), "obsm", "X_uni")
    """
    reserved = RESERVED_KEYS.get(where, {})
    if key in reserved:
        raise StemstDataError(
            f"{argument}={key!r} would replace {where}[{key!r}], {reserved[key]} in the stemst data model; "
            "choose another name."
        )
    if key in getattr(adata, where) and key not in set(owned):
        raise StemstDataError(
            f"{argument}={key!r}: {where}[{key!r}] already holds data this function did not write, and would be "
            f"lost. Choose another {argument}, or delete it first (del table.{where}[{key!r}]) if it may go."
        )


def check_embedding(values: Any, *, what: str) -> None:
    """Refuse embeddings that cannot condition a model: non-finite values, or the same vector for every spot.

    Parameters
    ----------
    values
        ``(n_spots, D)`` or ``(n_spots, views, D)`` embeddings.
    what
        How to name them in the message, e.g. ``"obsm['X_uni'] of section 'C2'"``.

    Raises
    ------
    StemstDataError
        If a value is NaN or infinite, or if there are several spots and all have the same embedding.

    Examples
    --------
    >>> check_embedding(np.array([[0.0, 1.0], [1.0, 1.0]]), what="obsm['X_demo']")
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim not in (2, 3) or x.shape[0] == 0:
        raise StemstDataError(f"{what}: expected (n_spots, dim) or (n_spots, views, dim) values, got {x.shape}.")
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
        raise StemstDataError(
            f"{what}: {int(bad.sum())} of {len(x)} spots have NaN or infinite embeddings (e.g. row "
            f"{int(np.flatnonzero(bad)[0])}). Embed those spots with stemst.pp.embed_patches, or check the encoder "
            "(a custom encoder, or half precision overflowing)."
        )
    if len(x) > 1 and np.ptp(x, axis=0).max() <= 1e-6 * (1.0 + np.abs(x).max()):
        raise StemstDataError(
            f"{what}: all {len(x)} spots have the same embedding, so the image cannot tell them apart. The patches "
            "are probably identical: is the image blank or a placeholder, or do the spot coordinates miss the "
            "image content (check the scale factor and obsm['spatial'])?"
        )


def check_raw_counts(values: Any, *, what: str, sections_: np.ndarray | None = None) -> None:
    """Refuse counts that are not raw counts: NaN or infinite, negative, or non-integer values.

    Every stored value is checked (the non-zeros of a sparse matrix), so a normalised or log-transformed table
    (``sc.pp.normalize_total`` + ``sc.pp.log1p``) is caught before it is trained on or scored.

    Parameters
    ----------
    values
        Spots x genes counts, dense or sparse.
    what
        How to name them in the message, e.g. ``"X of table 'table'"``.
    sections_
        Section of each row, to say where the bad spots are.

    Raises
    ------
    StemstDataError
        Naming ``what``, how many spots are affected (and in which sections) and what to pass instead.

    Examples
    --------
    >>> check_raw_counts(np.array([[0, 3], [1, 0]]), what="X")
    >>> check_raw_counts(np.log1p(np.array([[0, 3], [1, 0]])), what="X")
    Traceback (most recent call last):
    ...
    stemst._errors.StemstDataError: X holds non-integer values (e.g. 1.3862943611198906) in 2 of 2 spots...
    """
    m = sp.csr_matrix(values) if sp.issparse(values) else np.asarray(values)
    data = m.data if sp.issparse(m) else m
    for problem, bad in (
        ("NaN or infinite values", lambda d: ~np.isfinite(d)),
        ("negative values", lambda d: d < 0),
        ("non-integer values", lambda d: np.mod(d, 1) != 0),
    ):
        flags = bad(data)
        if not flags.any():
            continue
        if sp.issparse(m):
            rows = np.unique(np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))[flags])
        else:
            rows = np.flatnonzero(flags.reshape(len(flags), -1).any(axis=1))
        where = ""
        if sections_ is not None:
            where = f" (sections {sorted(set(np.asarray(sections_, dtype=str)[rows].tolist()))})"
        raise StemstDataError(
            f"{what} holds {problem} (e.g. {float(data[flags][0])}) in {len(rows)} of {m.shape[0]} spots{where}. stemst "
            "needs raw integer UMI counts, not normalised, log-transformed, scaled or imputed values: pass the raw "
            "counts (put them back in X, or pass layer= naming the layer that holds them), and drop or fill spots "
            "with missing counts."
        )

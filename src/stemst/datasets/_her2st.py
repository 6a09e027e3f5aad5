"""HER2-positive breast cancer legacy-ST sections (Andersson et al., Nat. Commun. 2021)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stemst._errors import StemstDownloadError, StemstFileError
from stemst._logging import logger
from stemst._schema import StemstDataError, assemble, make_section
from stemst._utils import reading
from stemst.io._image import read_image

HER2ST_COMMIT = "85df7411b987a7dec3feff9718b869a7a82091ec"
HER2ST_URL = f"https://github.com/almaan/her2st/raw/{HER2ST_COMMIT}/"
#: ST spots: 100 µm wide on a 200 µm centre-to-centre grid (array step).
ST_SPOT_DIAMETER_UM = 100.0
ST_ARRAY_STEP_UM = 200.0
#: A1's image in the repository is a 2000 px wide downscale of the original, 6954 px wide (``app/data/dims.list``).
A1_ORIGINAL_WIDTH = 6954
A1_IMAGE = "app/www/imgs/A1_HE_image_dark.png"
DEFAULT_SECTIONS = ("C2", "C3", "C4", "C5", "C6")


@cache
def _registry() -> dict[str, str]:
    text = resources.files("stemst.datasets").joinpath("her2st_sha256.txt").read_text()
    reg = {}
    for line in text.splitlines():
        if line.strip():
            digest, path = line.split(maxsplit=1)
            reg[path.strip()] = f"sha256:{digest}"
    return reg


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    import pooch

    if cache_dir is not None:
        base = Path(cache_dir)
    elif os.environ.get("STEMST_DATA_DIR"):
        base = Path(os.environ["STEMST_DATA_DIR"])
    else:
        base = Path(pooch.os_cache("stemst"))
    return base / "her2st"


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch(cache: Path, rel: str) -> str:
    """Path of ``rel`` in the cache, downloaded (and checksummed) if absent; errors name the file and what to do."""
    import pooch

    local = cache / rel
    expected = _registry()[rel].removeprefix("sha256:")
    if local.is_file():
        if _sha256(local) == expected:
            return str(local)
        raise StemstFileError(
            local,
            f"the cached file fails its SHA-256 check (expected {expected}): it is corrupt or a partial download. "
            "Delete it; the next call downloads it again.",
        )
    fetcher = pooch.create(path=cache, base_url=HER2ST_URL, registry=_registry(), retry_if_failed=2)
    try:
        return fetcher.fetch(rel, progressbar=False)
    except Exception as e:  # pooch passes on whatever requests or the file system raised
        raise StemstDownloadError(
            f"Could not download the HER2ST file {rel} from {HER2ST_URL}{rel} into {cache} "
            f"({type(e).__name__}: {e}). Check the network connection, or put the files in the cache yourself: "
            f"<cache>/her2st/<path in the repository>, where <cache> is `cache_dir=` or the environment variable "
            "STEMST_DATA_DIR."
        ) from e


def _image_path(section: str) -> str | None:
    if section == "A1":
        return A1_IMAGE
    prefix = f"data/ST-imgs/{section[0]}/{section}/"
    hits = [p for p in _registry() if p.startswith(prefix) and p.lower().endswith((".jpg", ".png", ".tif", ".tiff"))]
    return hits[0] if hits else None


def her2st_sections() -> dict[str, bool]:
    """All HER2ST sections with counts, and whether an H&E image is available for them.

    Examples
    --------
    >>> import stemst
    >>> avail = stemst.datasets.her2st_sections()
    >>> [s for s, has_image in avail.items() if has_image]
    ['A1', 'C2', 'C3', 'C4', 'C5', 'C6']
    """
    names = sorted(p.split("/")[-1].removesuffix(".tsv.gz") for p in _registry() if p.startswith("data/ST-cnts/"))
    return {s: _image_path(s) is not None for s in names}


def _load_section(cache: Path, section: str) -> Any:
    counts_file = _fetch(cache, f"data/ST-cnts/{section}.tsv.gz")
    spots_file = _fetch(cache, f"data/ST-spotfiles/{section}_selection.tsv")
    with reading(counts_file, "HER2ST counts table"):
        counts = pd.read_csv(counts_file, sep="\t", index_col=0)
    with reading(spots_file, "HER2ST spot file"):
        spots = pd.read_csv(spots_file, sep="\t")
        spots.index = [f"{x}x{y}" for x, y in zip(spots["x"], spots["y"], strict=True)]
    image_rel = _image_path(section)
    image, _ = read_image(_fetch(cache, image_rel))
    scale = image.shape[1] / A1_ORIGINAL_WIDTH if section == "A1" else 1.0
    missing = counts.index.difference(spots.index)
    if len(missing):
        raise StemstDataError(
            f"HER2ST {section}: {len(missing)} spots with counts have no coordinates, e.g. {list(missing[:5])}."
        )
    spots = spots.loc[counts.index]
    coords = spots[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64) * scale
    # pixel size from a least-squares fit of pixel position against array position (200 µm per array step)
    step_x = np.polyfit(spots["x"], coords[:, 0], 1)[0]
    step_y = np.polyfit(spots["y"], coords[:, 1], 1)[0]
    mpp = ST_ARRAY_STEP_UM / float(np.mean([step_x, step_y]))
    obs = pd.DataFrame({"array_col": spots["x"].to_numpy(), "array_row": spots["y"].to_numpy()}, index=counts.index)
    return make_section(
        section,
        image=image,
        counts=counts.to_numpy(),
        genes=counts.columns,
        spot_ids=counts.index,
        coords=coords,
        microns_per_pixel=mpp,
        spot_diameter_um=ST_SPOT_DIAMETER_UM,
        source=f"{HER2ST_URL}{image_rel}",
        obs=obs,
        extra={"patient": section[0], "platform": "Spatial Transcriptomics (legacy ST)", "image_scale": scale},
    )


def her2st(
    sections: str | Sequence[str] = DEFAULT_SECTIONS,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> Any:
    """Load HER2ST breast-cancer sections with their H&E images as a :class:`~spatialdata.SpatialData`.

    Files are downloaded on first use from the public repository ``almaan/her2st`` at a pinned commit, checked
    against SHA-256 sums, and cached. Sections C2-C6 are serial sections of one tumour (patient C) with
    full-resolution images (~0.69 µm/px); A1 (patient A) comes from a 2000 px wide downscale (~3.2 µm/px),
    useful as a cross-patient, low-resolution test.

    Parameters
    ----------
    sections
        Section names, e.g. ``("C2", "C3")``. Only sections with an image can be loaded
        (see :func:`her2st_sections`).
    cache_dir
        Cache folder. Defaults to the environment variable ``STEMST_DATA_DIR``, else the OS cache
        (``pooch.os_cache("stemst")``). Files live under ``<cache_dir>/her2st/`` with the repository's own paths.

    Returns
    -------
    :class:`~spatialdata.SpatialData` in the stemst data model (see :doc:`/data_model`): per section an image
    ``"<section>_he"``, circles ``"<section>_spots"``, and one table ``"table"`` of raw counts.

    Please cite Andersson et al., Nature Communications 12, 6012 (2021) when using this data.

    Raises
    ------
    StemstDownloadError
        If a file is neither in the cache nor downloadable (the message says where to put it).
    StemstFileError
        If a cached file fails its checksum (delete it to download it again) or cannot be read.

    Examples
    --------
    >>> import stemst
    >>> sdata = stemst.datasets.her2st(["C2", "C3"])
    >>> sdata.tables["table"].obs["section"].value_counts().sort_index().tolist()
    [187, 180]
    """
    if isinstance(sections, str):
        sections = [sections]
    sections = list(dict.fromkeys(sections))
    available = her2st_sections()
    unknown = [s for s in sections if s not in available]
    if unknown:
        raise StemstDataError(f"Unknown HER2ST sections {unknown}; known sections: {sorted(available)}.")
    no_image = [s for s in sections if not available[s]]
    if no_image:
        with_image = [s for s, ok in available.items() if ok]
        raise StemstDataError(
            f"HER2ST sections {no_image} have counts but no H&E image in the public repository's mirror; "
            f"sections with images: {with_image}."
        )
    cache = _cache_dir(cache_dir)
    parts = []
    for s in sections:
        logger.info("Loading HER2ST section %s", s)
        parts.append(_load_section(cache, s))
    return assemble(parts)

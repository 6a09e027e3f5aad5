"""Stain robustness on HER2ST, validation only: which embedding option makes predictions survive a stain change?

Train C2-C4 (``stemst.tl.fit`` holds C4 out itself for early stopping and calibration), score C5 and a synthetic
stain shift of C5 (its image with the haematoxylin optical density x1.25 and the eosin x0.75, ``SHIFT``: another
lab's darker nuclei and paler cytoplasm). Options of ``stemst.pp.embed_patches``:

- ``plain``: the package defaults;
- ``norm``: ``stain_norm=True`` on the training sections (a Macenko reference fitted on C2-C4), and C5 / shifted C5
  normalised to that reference;
- ``jitter``: ``stain_jitter=2`` on the training sections (two HED-jittered copies, 8 views each), C5 plain.

Everything else is the package defaults (100-gene panel chosen on C2-C4, context features, 20 samples x 25
DPM-Solver++ steps, as in ``benchmarks/her2st.py``). With ``--a1``, A1 (patient A; never used to choose) is also
scored with the same models, for information; ``--cross-patient`` instead trains on C2-C6 and scores A1, the
cross-patient split of ``benchmarks/her2st.py`` (information only). About 20-30 minutes on a 2-core CPU::

    STEMST_DATA_DIR=../shared/data .venv/bin/python benchmarks/stain.py --cache ../notes/cache --a1
    STEMST_DATA_DIR=../shared/data .venv/bin/python benchmarks/stain.py --cache ../notes/cache --cross-patient \
        --options plain norm

Writes ``benchmarks/results/stain.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import dask.array as da
import numpy as np

import stemst
from stemst._schema import image_key
from stemst.pp._stain import hed_rescale

HERE = Path(__file__).parent
RESULT = HERE / "results" / "stain.json"
TRAIN, VAL = ["C2", "C3", "C4"], "C5"
C_SECTIONS = ["C2", "C3", "C4", "C5", "C6"]
#: the synthetic stain change: haematoxylin, eosin, DAB optical densities scaled by these
SHIFT = (1.25, 0.75, 1.0)
OPTIONS = {"plain": {}, "norm": {"stain_norm": True}, "jitter": {"stain_jitter": 2}}
PREDICT = {"n_samples": 20, "sampler": "dpmpp_2m", "steps": 25, "progress": False}
SCORES = ("mean_pearson", "mse", "coverage_50", "coverage_90")


def shift_stain(sdata, section: str, scale=SHIFT) -> None:
    """Replace every pyramid level of ``section``'s image by its HED-rescaled version (computed once, in memory)."""
    el = sdata.images[image_key(section)]
    for level in list(el.children):
        ds = el[level].to_dataset()
        arr = ds["image"].data
        shifted = da.map_blocks(lambda b: hed_rescale(b[None], scale)[0], arr, dtype=np.uint8).persist()
        el[level] = ds.assign(image=(ds["image"].dims, shifted))


def embed(sdata, key: str, sections, cache, **kw) -> None:
    stemst.pp.embed_patches(sdata, sections=sections, key_added=key, cache=cache, progress=False, **kw)


def score(model, sdata, section: str, name: str) -> dict:
    pred = stemst.tl.predict(model, sdata, sections=section, key_added=name, **PREDICT)
    summary = stemst.tl.evaluate(sdata, pred_key=pred, key_added=None).summary
    ood = sdata.tables[pred].uns.get("stemst_ood", {}).get(section, {})
    del sdata.tables[pred]
    return {**{k: float(summary[k]) for k in SCORES}, "fraction_ood": float(ood.get("fraction_ood", np.nan))}


def cross_patient(options: list[str], cache: str) -> dict:
    """Information only: train C2-C6 (C6 held out by fit), score A1, as ``benchmarks/her2st.py`` splits it."""
    sdata = stemst.datasets.her2st(C_SECTIONS)
    a1 = stemst.datasets.her2st(["A1"])
    genes = stemst.pp.select_genes(sdata, train_sections=C_SECTIONS, n_genes=100, inplace=False)
    rows = {}
    for name in options:
        kw, key = OPTIONS[name], f"X_{name}"
        embed(sdata, key, C_SECTIONS, cache, **kw)
        norm = sdata.tables["table"].uns["stemst"]["embeddings"][key].get("stain_norm")
        embed(a1, key, ["A1"], cache, **({"stain_norm": norm} if norm else {}))
        ctx = stemst.pp.spatial_context(sdata, embedding_key=key)
        stemst.pp.spatial_context(a1, embedding_key=key)
        model = stemst.tl.fit(sdata, genes=genes, sections=C_SECTIONS, embedding_key=ctx, progress=False)
        rows[name] = score(model, a1, "A1", f"a_{name}")
        print("C2-C6 -> A1", name, json.dumps(rows[name]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=str(HERE / "results" / "cache" / "embeddings"))
    parser.add_argument("--options", nargs="*", default=list(OPTIONS))
    parser.add_argument("--a1", action="store_true", help="also score A1 (information only)")
    parser.add_argument(
        "--cross-patient", action="store_true", help="only train C2-C6 and score A1 for --options (information only)"
    )
    args = parser.parse_args()
    t_start = time.perf_counter()
    if args.cross_patient:
        rows = cross_patient(args.options, args.cache)
        out = json.loads(RESULT.read_text()) if RESULT.is_file() else {}  # read now: another run may have written
        out["cross_patient"] = {**out.get("cross_patient", {}), **rows}
        RESULT.write_text(json.dumps(out, indent=1))
        return
    sdata = stemst.datasets.her2st(TRAIN)
    val = stemst.datasets.her2st([VAL])  # a table of its own, as a new slide's (its views may differ in number)
    shifted = stemst.datasets.her2st([VAL])
    shift_stain(shifted, VAL)
    a1 = stemst.datasets.her2st(["A1"]) if args.a1 else None
    genes = stemst.pp.select_genes(sdata, train_sections=TRAIN, n_genes=100, inplace=False)
    out = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    out.update({"train": TRAIN, "validation": VAL, "shift_hed_scale": SHIFT, "predict": PREDICT})
    out.setdefault("results", {})
    for name in args.options:
        t0 = time.perf_counter()
        kw = OPTIONS[name]
        key = f"X_{name}"
        embed(sdata, key, TRAIN, args.cache, **kw)
        test_kw = {}
        if kw.get("stain_norm"):  # a new slide is normalised to the training sections' reference
            test_kw["stain_norm"] = sdata.tables["table"].uns["stemst"]["embeddings"][key]["stain_norm"]
        embed(val, key, [VAL], args.cache, **test_kw)
        embed(shifted, key, [VAL], f"{args.cache}/shifted", **test_kw)
        ctx = stemst.pp.spatial_context(sdata, embedding_key=key)
        stemst.pp.spatial_context(val, embedding_key=key)
        stemst.pp.spatial_context(shifted, embedding_key=key)
        model = stemst.tl.fit(sdata, genes=genes, sections=TRAIN, embedding_key=ctx, progress=False)
        row = {"C5": score(model, val, VAL, f"p_{name}"), "C5_shifted": score(model, shifted, VAL, f"s_{name}")}
        if a1 is not None:
            embed(a1, key, ["A1"], args.cache, **test_kw)
            stemst.pp.spatial_context(a1, embedding_key=key)
            row["A1"] = score(model, a1, "A1", f"a_{name}")
        row["seconds"] = time.perf_counter() - t0
        out["results"][name] = row
        print(name, json.dumps(row), flush=True)
        RESULT.write_text(json.dumps(out, indent=1))
    out["total_seconds"] = time.perf_counter() - t_start
    RESULT.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""Benchmark stemst.pp.embed_patches: spots/s and peak memory, on HER2ST C2 and on a synthetic 40k x 40k slide.

Each case runs in a fresh subprocess so that its memory is measured alone. Peak memory is the process's peak
resident set size (VmHWM, sampled from /proc every 20 ms as a fallback); "during" is the rise above the resident
size just before embedding (data opened, encoder built): the memory the embedding itself needs. The synthetic slide
is a lazy dask array (one 1024 px tile repeated 40 x 40 times) turned into a 5-level pyramid by
stemst._schema.assemble: 4.7 GiB as uint8 if it were loaded whole.

The ratio case measures, in one process, the encoder alone on random tensors (channels-last, inference mode, the
same batch size, before and after) and the full embed_patches on HER2ST C2 with the 8 dihedral views: how much of the
encoder's own rate the whole pipeline (reading, resampling, views, bookkeeping) keeps. No case reads or writes the
embedding cache.

The dense cases (issue #22): ``dense_vs_patch`` embeds C6's spots per patch and densely (one view) and compares the
features; ``predict_image_c6_<s>um`` times ``tl.predict_image`` over C6 at 100, 50, 25 and 8 µm (all 8 views; a model
trained briefly on C2-C5's cached per-patch features; ``STEMST_BENCH_SAMPLES`` samples per grid spot, default 2)
beside ``one_pass_seconds``, the encoder alone over the section's tissue for all views; ``dense_training`` trains
on per-patch and on dense features of three of C2-C5 and applies each model to the fourth's per-patch and dense
features (validation folds C5 and C2, inside the training patient).

    STEMST_DATA_DIR=../shared/data HF_HUB_OFFLINE=1 python benchmarks/embed.py
    python benchmarks/embed.py --cases her2st_c2_encoder_ratio     # the ratio case alone

writes benchmarks/results/embed.json and docs/benchmarks_embed.md (runs of a subset of cases update those cases).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "embed.json"
TABLE = ROOT / "docs" / "benchmarks_embed.md"

# case name -> (data, encoder, number of spots or None for all, augment)
CASES = {
    "her2st_c2_efficientnet": ("her2st_c2", "efficientnet_lite0", None, False),
    "her2st_c2_color_stats": ("her2st_c2", "color_stats", None, True),
    "synthetic_40k_efficientnet": ("synthetic_40k", "efficientnet_lite0", 256, False),
    "synthetic_40k_color_stats": ("synthetic_40k", "color_stats", None, True),
    "her2st_c2_encoder_ratio": ("her2st_c2", "efficientnet_lite0", None, True),
}
#: cases that also time the encoder alone, for the ratio full pipeline / encoder only
RATIO_CASES = {"her2st_c2_encoder_ratio"}
#: predict_image over HER2ST C6 (model: C2-C5, per-patch features, default context) at these grid spacings (µm)
SPACINGS = (100, 50, 25, 8)
DENSE_CASES = ["dense_vs_patch", *(f"predict_image_c6_{s}um" for s in SPACINGS), "dense_training"]
#: dense_training's folds: (training sections, validation section), all inside patient C
DENSE_FOLDS = ((["C2", "C3", "C4"], "C5"), (["C3", "C4", "C5"], "C2"))
#: samples per grid spot in the predict_image cases (STEMST_BENCH_SAMPLES): sampling, not embedding, is the cost of
#: a fine grid on a CPU (~1 ms per spot-sample with the default MLP), so the embedding is timed with few samples
BENCH_SAMPLES = int(os.environ.get("STEMST_BENCH_SAMPLES", "2"))
TRAIN = ["C2", "C3", "C4", "C5"]


def _rss_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PeakSampler:
    """Track the peak resident memory of this process (sampling thread + the kernel's high-water mark)."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self._stop = interval, _rss_mib(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mib())
            time.sleep(self.interval)

    def __enter__(self) -> PeakSampler:
        try:  # reset the kernel's high-water mark so VmHWM covers only what follows
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib("VmHWM"))


def _synthetic_40k(n_spots: int = 2000):
    import dask.array as da
    import numpy as np

    from stemst._schema import assemble, make_section

    rng = np.random.default_rng(0)
    tile = rng.integers(0, 256, (3, 1024, 1024), dtype=np.uint8)
    tile[0] |= 0x80  # pinkish, like eosin
    image = da.tile(da.from_array(tile, chunks=(3, 1024, 1024)), (1, 40, 40))  # (3, 40960, 40960), lazy
    side = int(np.ceil(np.sqrt(n_spots)))
    grid = np.linspace(2000, image.shape[1] - 2000, side)
    xy = np.stack(np.meshgrid(grid, grid), -1).reshape(-1, 2)[:n_spots]
    counts = rng.poisson(1.0, (n_spots, 8))
    sec = make_section(
        "SYN",
        image=image,
        counts=counts,
        genes=[f"G{i}" for i in range(8)],
        spot_ids=[f"s{i}" for i in range(n_spots)],
        coords=xy,
        microns_per_pixel=0.5,
        spot_diameter_um=55.0,
        source="synthetic",
    )
    return assemble([sec]), "SYN"


def encoder_rate(model, size: int, *, images: int = 384) -> float:
    """Images/s of the encoder alone on random tensors: channels-last, inference mode, embed_patches' batch size."""
    import torch

    from stemst._torch import autocast, resolve_device
    from stemst.pp._embed import default_batch_size

    device = resolve_device("auto")
    batch_size = default_batch_size(device)
    batches = max(1, images // batch_size)
    model = model.to(device).to(memory_format=torch.channels_last)
    x = torch.rand(batch_size, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(device):
        model(x)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(batches):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batches * batch_size / (time.perf_counter() - t0)


def run_case(name: str) -> dict:
    import numpy as np
    import spatialdata as sd

    import stemst
    from stemst._schema import get_image, image_key
    from stemst.pp._encoders import resolve_encoder

    data, encoder, n_spots, augment = CASES[name]
    if data == "her2st_c2":
        sdata, section = stemst.datasets.her2st(["C2"]), "C2"
    else:
        sdata, section = _synthetic_40k()
    table = sdata.tables["table"]
    if n_spots is not None and n_spots < table.n_obs:
        rows = np.linspace(0, table.n_obs - 1, n_spots).astype(int)
        sdata = sd.SpatialData(
            images=dict(sdata.images), shapes=dict(sdata.shapes), tables={"table": table[rows].copy()}
        )
    spec = resolve_encoder(encoder)
    model = spec.load()  # warms the weight file cache; the model is built again inside, as a user would
    ratio = name in RATIO_CASES
    load_before = os.getloadavg()[0]
    alone = [encoder_rate(model, spec.input_size)] if ratio else []
    image = get_image(sdata, section)
    before = _rss_mib()
    with PeakSampler() as peak:
        t0 = time.perf_counter()
        stemst.pp.embed_patches(sdata, encoder=encoder, augment=augment, progress=False, device="auto", cache=False)
        seconds = time.perf_counter() - t0
    if ratio:
        alone.append(encoder_rate(model, spec.input_size))
    t = sdata.tables["table"]
    settings = t.uns["stemst"]["embeddings"][f"X_{encoder}"]
    n = t.n_obs
    views = 8 if augment else 1
    result = {
        "case": name,
        "date": time.strftime("%Y-%m-%d"),
        "load_average_1min_before": round(load_before, 2),
        "load_average_1min_after": round(os.getloadavg()[0], 2),
        "data": data,
        "image_px": [int(s) for s in image.shape[1:]],
        "image_gib_if_loaded": round(float(np.prod(image.shape)) / 2**30, 2),
        "pyramid_levels": len(sdata.images[image_key(section)].children)
        if hasattr(sdata.images[image_key(section)], "children")
        else 1,
        "encoder": encoder,
        "spots": int(n),
        "views": views,
        "patch_px": settings["patch_px"][section],
        "level": settings["level"][section],
        "seconds": round(seconds, 2),
        "spots_per_s": round(n / seconds, 2),
        "images_per_s": round(n * views / seconds, 2),
        "rss_before_mib": round(before, 1),
        "peak_rss_mib": round(peak.peak, 1),
        "peak_rise_mib": round(peak.peak - before, 1),
        "finite": bool(np.isfinite(t.obsm[f"X_{encoder}"]).all()),
    }
    if ratio:
        result["encoder_only_images_per_s"] = [round(r, 2) for r in alone]
        result["ratio"] = round(result["images_per_s"] / float(np.mean(alone)), 3)
    return result


def _c6_model():
    """C2-C6 with cached per-patch embeddings (8 views) + context, and a briefly trained default model on C2-C5."""
    import stemst

    sdata = stemst.datasets.her2st([*TRAIN, "C6"])
    stemst.pp.embed_patches(sdata, augment=True, progress=False, verify_cache=False)
    key = stemst.pp.spatial_context(sdata)
    stemst.pp.select_genes(sdata, train_sections=TRAIN, n_genes=100)
    steps = int(os.environ.get("STEMST_BENCH_STEPS", "20"))  # predict_image's cost does not depend on training
    model = stemst.tl.fit(sdata, embedding_key=key, sections=TRAIN, steps=steps, progress=False, validation=None)
    return sdata, model


def _only_c6(sdata, model):
    """Drop C2-C5's images and spots after training (a user predicting a new slide holds that slide alone)."""
    import gc

    for elements in (sdata.images, sdata.shapes):
        for key in [k for k in elements if not k.startswith("C6")]:
            del elements[key]
    gc.collect()
    return sdata, model


def model_scale(sdata, section: str):
    """Return the default encoder and its model pixels per full-resolution pixel of ``section``."""
    from stemst.pp._embed import plan_section
    from stemst.pp._encoders import resolve_encoder

    enc = resolve_encoder("efficientnet_lite0")
    plan, _ = plan_section(sdata, sdata.tables["table"], section, encoders=[enc], patch_size_um=None)
    return enc, enc.input_size / plan.patch_px / plan.scale[0]


def one_pass_seconds(sdata, section: str, *, views: int = 8) -> tuple[float, float]:
    """Encoder alone, one pass per view over the section's tissue: (seconds, tissue megapixels at the model's scale).

    The tissue area is the tissue mask (:func:`stemst.pp.tissue_mask` on the coarsest level) in model pixels (the
    image rescaled so that a patch is the encoder's input size); the rate is the dense network on one 1024 px tile.
    """
    import numpy as np
    import torch

    from stemst._schema import get_image
    from stemst.pp import tissue_mask
    from stemst.pp._dense import dense_model, stage_maps

    enc, ratio = model_scale(sdata, section)
    full, coarse = get_image(sdata, section, scale=0), get_image(sdata, section, scale=99)
    fraction = float(tissue_mask(np.asarray(coarse)).mean())
    tissue_px = fraction * full.shape[1] * full.shape[2] * ratio**2
    net = dense_model(enc.load())
    x = torch.rand(1, 3, 1024, 1024).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        stage_maps(net, x)
        t0 = time.perf_counter()
        for _ in range(3):
            stage_maps(net, x)
    rate = 3 * 1024**2 / (time.perf_counter() - t0)
    return views * tissue_px / rate, tissue_px / 1e6


def patch_union_mpx(sdata, section: str, centres) -> float:
    """Return the model megapixels covered by the union of the grid spots' patches (``centres``: full-res ``(x, y)``).

    What any method that computes each spot's whole patch must encode per view (no tile margins): the floor beside
    the tissue's area. Rasterised at a quarter of the model's resolution (squares of ``input_size / 4`` cells round their edges).
    """
    import numpy as np

    enc, ratio = model_scale(sdata, section)
    cell = 4.0  # model px per raster cell
    side = int(round(enc.input_size / cell))
    lo = np.floor(np.asarray(centres, np.float64) * ratio / cell).astype(np.int64) - side // 2
    lo -= lo.min(0)
    canvas = np.zeros(tuple(lo.max(0) + side), bool)
    for x, y in lo:
        canvas[x : x + side, y : y + side] = True
    return float(canvas.sum()) * cell**2 / 1e6


def run_dense_case(name: str) -> dict:
    """``dense_vs_patch``: C6's spots, one view, per patch and dense; ``predict_image_c6_<s>um``: a grid over C6."""
    import stemst

    result = {"case": name, "date": time.strftime("%Y-%m-%d"), "load_average_1min_before": round(os.getloadavg()[0], 2)}
    if name == "dense_vs_patch":
        import spatialdata as sd

        sdata = stemst.datasets.her2st(["C6"])
        a = sd.SpatialData(
            images=dict(sdata.images), shapes=dict(sdata.shapes), tables={"table": sdata.tables["table"]}
        )
        b = sd.SpatialData(images=dict(sdata.images), tables={"table": sdata.tables["table"].copy()})
        t0 = time.perf_counter()
        stemst.pp.embed_patches(a, augment=False, cache=False, progress=False)
        t1 = time.perf_counter()
        stemst.pp.embed_patches(b, augment=False, cache=False, progress=False, dense=True)
        t2 = time.perf_counter()
        p, d = (x.tables["table"].obsm["X_efficientnet_lite0"] for x in (a, b))
        bounds = np.cumsum([0, 64, 32, 48, 80, 160, 224, 384, 640])
        result.update(
            spots=int(len(p)),
            views=1,
            max_abs_diff=round(float(np.abs(p - d).max()), 4),
            corr=round(float(np.corrcoef(p.ravel(), d.ravel())[0, 1]), 4),
            corr_per_stage=[
                round(float(np.corrcoef(p[:, i:j].ravel(), d[:, i:j].ravel())[0, 1]), 4)
                for i, j in zip(bounds[:-1], bounds[1:], strict=True)
            ],  # fmt: skip
            patch_seconds=round(t1 - t0, 2),
            dense_seconds=round(t2 - t1, 2),
        )
        return result
    if name == "dense_training":
        return {**result, **dense_training()}
    import stemst.tl._predict as tp

    spacing = float(name.removeprefix("predict_image_c6_").removesuffix("um"))
    sdata, model = _only_c6(*_c6_model())
    timings = {}
    predict = tp.predict

    def timed_predict(*args, **kwargs):  # the sampling part of predict_image
        t = time.perf_counter()
        out = predict(*args, **kwargs)
        timings["sample_seconds"] = time.perf_counter() - t
        return out

    tp.predict = timed_predict
    before = _rss_mib()
    with PeakSampler() as peak:
        t0 = time.perf_counter()
        key = stemst.tl.predict_image(
            model, sdata, "C6", spacing_um=spacing, n_samples=BENCH_SAMPLES, progress=False, dense="auto"
        )
        seconds = time.perf_counter() - t0
    tp.predict = predict
    alone, tissue_mpx = one_pass_seconds(sdata, "C6")
    pred = sdata.tables[key]
    result.update(
        spacing_um=spacing,
        grid_spots=int(pred.n_obs),
        views=8,
        n_samples=BENCH_SAMPLES,
        seconds=round(seconds, 1),
        sample_seconds=round(timings["sample_seconds"], 1),
        embed_seconds=round(seconds - timings["sample_seconds"], 1),
        one_pass_seconds=round(alone, 1),
        tissue_mpx_model_scale=round(tissue_mpx, 1),
        patch_union_mpx_model_scale=round(patch_union_mpx(sdata, "C6", pred.obsm["spatial"]), 1),
        ratio_to_one_pass=round(seconds / alone, 2),
        embed_ratio_to_one_pass=round((seconds - timings["sample_seconds"]) / alone, 2),
        rss_before_mib=round(before, 1),
        peak_rss_mib=round(peak.peak, 1),
        finite=bool(np.isfinite(pred.X).all()),
        load_average_1min_after=round(os.getloadavg()[0], 2),
    )
    return result


def dense_training() -> dict:
    """Per-patch vs dense features for training and for prediction, on the validation folds :data:`DENSE_FOLDS`.

    For each fold two models with the package defaults (100 genes chosen on the training sections, context, 8 views;
    ``fit`` holds one training section out for early stopping), one on per-patch and one on dense features, each
    applied to the validation section's per-patch and dense features (20 samples): four scores per fold, with the
    fraction of validation spots the out-of-distribution score flags.
    """
    import spatialdata as sd

    import stemst

    patch = stemst.datasets.her2st(sorted({s for train, val in DENSE_FOLDS for s in [*train, val]}))
    stemst.pp.embed_patches(patch, augment=True, progress=False, verify_cache=False)
    dense = sd.SpatialData(images=dict(patch.images), tables={"table": patch.tables["table"].copy()})
    t0 = time.perf_counter()
    stemst.pp.embed_patches(dense, augment=True, progress=False, dense=True)
    out: dict = {"dense_embed_seconds": round(time.perf_counter() - t0, 1), "folds": {}}
    for train, val in DENSE_FOLDS:
        data, models = {}, {}
        for kind, source in (("patch", patch), ("dense", dense)):
            data[kind] = sd.SpatialData(images=dict(source.images), tables={"table": source.tables["table"].copy()})
            key = stemst.pp.spatial_context(data[kind])
            stemst.pp.select_genes(data[kind], train_sections=train, n_genes=100)
            models[kind] = stemst.tl.fit(data[kind], embedding_key=key, sections=train, progress=False)
        fold = {}
        for trained, model in models.items():
            for applied, target in data.items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the mismatch and out-of-distribution warnings are measured here
                    key = stemst.tl.predict(
                        model, target, sections=val, n_samples=20, progress=False, key_added="p", overwrite=True
                    )
                summary = stemst.tl.evaluate(target, pred_key=key).summary
                scores = {
                    k: round(float(summary[k]), 4) for k in ("mean_pearson", "coverage_50", "coverage_90", "crps")
                }
                scores["fraction_ood"] = round(float(target.tables[key].obs["ood"].mean()), 3)
                fold[f"{trained}/{applied}"] = scores
        out["folds"][val] = {"train": train, **fold}
    return out


def _markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "# Benchmark: `stemst.pp.embed_patches`",
        "",
        f"Measured {meta['date']} on {meta['machine']} ({meta['cpus']} CPU cores, shared with other jobs; "
        f"torch {meta['torch']}, {meta['device']}). Command: `python benchmarks/embed.py`.",
        "",
        "Peak RSS is the whole process (Python, libraries, encoder, and for HER2ST the decoded JPEG held in memory); "
        "*rise* is the peak above the resident size just before embedding, i.e. what embedding itself needs. "
        "Patches are read batch by batch from the lazy image, so the rise does not grow with the slide: the 40k x 40k "
        "synthetic slide would take 4.7 GiB if loaded. With EfficientNet-Lite0 the rise is mostly the encoder's "
        "activations for one batch of 160 px images (`batch_size`, default 16 on a CPU), the same for both slides; "
        "the colour-statistics encoder shows the cost of reading the patches alone (~50 MiB).",
        "",
        f"The machine was shared (1-minute load average {meta['load_average_1min']:.1f} on {meta['cpus']} cores), so "
        "throughput is a lower bound for this hardware.",
        "",
        "| case | image (px) | encoder | spots x views | patch px (level) | s | spots/s | images/s | peak RSS (MiB) | rise (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in results if "image_px" in r):
        lines.append(
            f"| {r['case']} | {r['image_px'][1]} x {r['image_px'][0]} | {r['encoder']} | {r['spots']} x {r['views']} | "
            f"{r['patch_px']} ({r['level']}) | {r['seconds']} | {r['spots_per_s']} | {r['images_per_s']} | "
            f"{r['peak_rss_mib']} | {r['peak_rise_mib']} |"
        )
    ratios = [r for r in results if "ratio" in r]
    if ratios:
        lines += [
            "",
            "## Whole pipeline vs the encoder alone",
            "",
            "In one process: the encoder alone on random tensors (channels-last, inference mode, `embed_patches`' "
            "default batch size: 16 images on a CPU, 256 on CUDA), timed before and after `embed_patches` on the "
            "section (8 dihedral views per spot, the same batch size, no cache). The ratio is the pipeline's images/s over the mean of the two encoder-only "
            "rates: the share of the encoder's own speed that reading, resampling, the views and the bookkeeping keep. "
            "Load averages are the 1-minute values before and after the case.",
            "",
            "| case | date | encoder alone (images/s, before / after) | embed_patches (images/s) | ratio | load avg |",
            "|---|---|---|---|---|---|",
        ]
        for r in ratios:
            alone = " / ".join(f"{v:.1f}" for v in r["encoder_only_images_per_s"])
            lines.append(
                f"| {r['case']} | {r.get('date', '')} | {alone} | {r['images_per_s']:.1f} | {r['ratio']:.2f} | "
                f"{r.get('load_average_1min_before', float('nan')):.1f} / "
                f"{r.get('load_average_1min_after', float('nan')):.1f} |"
            )
    return "\n".join(lines + _dense_markdown(results)) + "\n"


def _dense_markdown(results: list[dict]) -> list[str]:
    """The dense-embedding cases: per-patch vs dense features, the validation fold, predict_image at each spacing."""
    by = {r["case"]: r for r in results}
    lines = []
    if "dense_vs_patch" in by:
        r = by["dense_vs_patch"]
        lines += [
            "",
            "## Dense vs per-patch features",
            "",
            f"HER2ST C6, its {r['spots']} spots, one view ({r['date']}): max abs difference {r['max_abs_diff']}, "
            f"correlation {r['corr']}; per stage (stem, stages 0-6) {r['corr_per_stage']}. The shallow stages agree; "
            "the two deepest (5 x 5 cells per patch) differ because a patch's own zero padding reaches their every "
            f"cell. Per patch {r['patch_seconds']} s, dense {r['dense_seconds']} s (sparse spots: no gain).",
        ]
    if "dense_training" in by:
        r = by["dense_training"]
        lines += [
            "",
            "## Training on per-patch or dense features, predicting on either",
            "",
            f"Validation folds inside patient C ({r['date']}): package defaults, 100 genes, 8 views, 20 samples; "
            f"dense features of C2-C5's spots took {r['dense_embed_seconds']} s (sparse ST spots: a dense pass reads "
            "the whole tissue). `trained / applied` names the features' path.",
            "",
            "| validation section | trained / applied | mean r | coverage 50 | coverage 90 | CRPS | flagged OOD |",
            "|---|---|---|---|---|---|---|",
        ]
        for val, fold in r["folds"].items():
            for combo in ("patch/patch", "dense/dense", "patch/dense", "dense/patch"):
                m = fold[combo]
                lines.append(
                    f"| {val} | {combo} | {m['mean_pearson']:.4f} | {m['coverage_50']:.3f} | {m['coverage_90']:.3f} | "
                    f"{m['crps']:.4f} | {m['fraction_ood']:.3f} |"
                )
    grid = [by[c] for c in DENSE_CASES if c in by and c.startswith("predict_image")]
    if grid:
        lines += [
            "",
            "## `predict_image` over HER2ST C6 at any spacing",
            "",
            "All 8 views, `dense='auto'` (dense where a dense pass reads fewer pixels than the patches, a dense pixel "
            "counted 1.5x: 50 µm and finer; per patch at 100 µm); `one pass` is the encoder alone over the section's "
            "tissue for all views (its rate measured in the same process); sampling uses the `n_samples` shown (its "
            "cost grows with spots x samples). `load` is the 1-minute load average before / after the case on the "
            "shared 2-core machine: above 2, other jobs took part of the CPU and every time is pessimistic.",
            "",
            "`tissue` is the tissue's area and `union` the union of the grid spots' patches, in model megapixels per "
            "view: a spot's features are statistics over its whole patch, so every method that computes them encodes "
            "at least the union, and the dense pass also reads a margin around its tiles. `ratio` is the whole call "
            "over one pass, `embed ratio` the embedding alone.",
            "",
            "| spacing (µm) | grid spots | views | samples | s | embed s | sample s | one pass s | ratio | embed ratio | tissue / union (M px) | peak RSS (MiB) | load | date |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in grid:
            load = f"{r.get('load_average_1min_before', float('nan')):.1f} / {r.get('load_average_1min_after', float('nan')):.1f}"
            lines.append(
                f"| {r['spacing_um']:g} | {r['grid_spots']} | {r['views']} | {r['n_samples']} | {r['seconds']} | "
                f"{r['embed_seconds']} | {r['sample_seconds']} | {r['one_pass_seconds']} | {r['ratio_to_one_pass']} | "
                f"{r.get('embed_ratio_to_one_pass', '-')} | {r['tissue_mpx_model_scale']} / "
                f"{r.get('patch_union_mpx_model_scale', '-')} | {r['peak_rss_mib']} | {load} | {r['date']} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--case", choices=sorted([*CASES, *DENSE_CASES]), help="run one case in this process and print its JSON"
    )
    parser.add_argument("--cases", nargs="*", default=[*CASES, *DENSE_CASES], help="cases to run (default all)")
    parser.add_argument("--table-only", action="store_true", help="rewrite the markdown table from the JSON results")
    args = parser.parse_args()
    if args.table_only:
        saved = json.loads(RESULTS.read_text())
        TABLE.write_text(_markdown(saved["results"], saved["meta"]))
        return
    if args.case:
        runner = run_dense_case if args.case in DENSE_CASES else run_case
        print("RESULT " + json.dumps(runner(args.case)), flush=True)
        return
    import torch

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    results = []
    for name in args.cases:
        out = subprocess.run([sys.executable, __file__, "--case", name], env=env, capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not line:
            sys.exit(f"case {name} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(line[-1][len("RESULT ") :]))
        print(json.dumps(results[-1]), flush=True)
        if "ratio" in results[-1]:
            r = results[-1]
            print(
                f"{name}: encoder alone {r['encoder_only_images_per_s']} images/s, embed_patches "
                f"{r['images_per_s']} images/s, ratio {r['ratio']:.3f}",
                flush=True,
            )
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "device": "CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
        "load_average_1min": os.getloadavg()[0],
    }
    order = [*CASES, *DENSE_CASES]
    if RESULTS.exists() and set(args.cases) != set(order):  # a subset: keep the other cases' earlier results
        fresh = {r["case"] for r in results}
        earlier = [
            r for r in json.loads(RESULTS.read_text())["results"] if r["case"] not in fresh and r["case"] in order
        ]
        results = sorted(earlier + results, key=lambda r: order.index(r["case"]) if r["case"] in order else 99)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    TABLE.write_text(_markdown(results, meta))
    print(f"wrote {RESULTS} and {TABLE}")


if __name__ == "__main__":
    main()

"""HER2ST benchmark: stemst against baselines, leave-one-section-out over C2-C6 and cross-patient (C2-C6 -> A1).

One command (about 30-40 minutes on a 2-core CPU)::

    STEMST_DATA_DIR=../shared/data .venv/bin/python benchmarks/her2st.py

Writes ``benchmarks/results/her2st.json`` (every number) and ``docs/benchmarks_her2st.md`` (the tables).
Every method sees the same embeddings (the default encoder: EfficientNet-Lite0 stage statistics, 8 views) and,
per split, the same gene panel chosen on the training sections only. Nothing is tuned on a test section: stemst's
settings are the package defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np
import pandas as pd

import stemst
from stemst._schema import embedding_key
from stemst._utils import markdown_table
from stemst.metrics import pearson_per_gene, relative_variance_distance
from stemst.model.samplers import step_grid

HERE = Path(__file__).parent
RESULTS = HERE / "results"
DOCS = HERE.parent / "docs" / "benchmarks_her2st.md"
C_SECTIONS = ["C2", "C3", "C4", "C5", "C6"]
N_SAMPLES, SAMPLER, SAMPLER_STEPS = 20, "dpmpp_2m", 25
METRICS = [
    "crps",
    "energy_score",
    "variogram_score",
    "crps_counts",
    "coverage_50",
    "coverage_90",
    "domain_ari",
    "moran_spearman",
    "svg_overlap",
    "gene_corr_distance",
    "mean_pearson_norm",
    "mean_pearson",
    "pcc_50",
    "mse",
    "rvd",
    "rvd_samples",
    "coverage_80",
    "coverage_95",
    "neighbour_corr",
    "region_coverage_90",
]
#: downstream-fidelity metrics (stemst.tl.structure_metrics) and whether higher is better; each method reports the
#: better of its mean (expected counts) and its first sample, the same rule for every method
STRUCTURE = {"domain_ari": True, "moran_spearman": True, "svg_overlap": True, "gene_corr_distance": False}
#: measured spots of the cross-patient section the model is adapted on (stemst.tl.adapt), 0 = not adapted
ADAPT_SPOTS = (0, 5, 10, 20, 50)
#: probabilistic baselines: the mean of these deterministic baselines plus noise fitted on fit's held-out section
NOISY = ("ridge_cv+ctx", "mlp+ctx")
NOISE_KINDS = ("gauss", "mvn", "resid")
#: baselines: name -> (method, settings, features: "own" = the spot's patch, "context" = own + ring-1 + ring-2)
BASELINES = {
    "ridge_hest": ("ridge", {"alpha": "hest"}, "own"),
    "ridge_cv": ("ridge", {"alpha": "cv"}, "own"),
    "knn": ("knn", {"k": 50}, "own"),
    "ridge_cv+ctx": ("ridge", {"alpha": "cv"}, "context"),
    "knn+ctx": ("knn", {"k": 50}, "context"),
    "mlp+ctx": ("mlp", {}, "context"),
}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def embed(sdata, encoder: str, cache: Path) -> str:
    """Embed all spots (8 views) through the package's embedding cache in ``cache`` (not committed).

    The cache is keyed by the encoder's weights and code, the patch settings and the pixels, so a changed encoder
    embeds again and an unchanged one is read back.
    """
    t0 = time.perf_counter()
    stemst.pp.embed_patches(sdata, encoder=encoder, augment=True, cache=cache)
    table = sdata.tables["table"]
    key = embedding_key(encoder)
    table.uns["stemst"]["embeddings"][key]["benchmark_seconds"] = time.perf_counter() - t0
    return key


def spatial_calibration(sdata, pred_key: str) -> dict:
    """Do the samples carry the spatial correlation of real tissue?

    ``neighbour_corr``: correlation between ring-1 neighbours of the samples' deviations from the predicted mean
    (mean over genes and 5 samples), beside ``neighbour_corr_true``, the same for the measured values' deviations.
    ``region_coverage_90``: coverage of the central 90% sample interval of the mean over each spot and its ring-1
    neighbours (independent per-spot noise averages out over a region and makes these intervals too narrow).
    """
    from stemst._spatial import neighbourhoods
    from stemst.tl._data import get_targets

    pred = sdata.tables[pred_key]
    if "samples" not in pred.obsm or pred.obsm["samples"].shape[1] < 2:  # deterministic: no spread to judge
        return {}
    table = sdata.tables["table"]
    truth = get_targets(table[pred.obs_names], list(pred.var_names), pred.uns["stemst_prediction"]["transform"])
    samples, mean = np.transpose(pred.obsm["samples"], (1, 0, 2)), np.asarray(pred.X)
    nb, _ = neighbourhoods(np.asarray(pred.obsm["spatial"]))
    i, j = np.nonzero(nb[:, 1:] >= 0)
    a, b = i, nb[:, 1:][i, j]

    def corr(d):  # per gene over neighbour pairs, averaged over the genes that vary
        x, y = d[a] - d[a].mean(0), d[b] - d[b].mean(0)
        den = np.sqrt((x * x).sum(0) * (y * y).sum(0))
        return float(np.mean((x * y).sum(0)[den > 0] / den[den > 0]))

    w = (nb >= 0) / (nb >= 0).sum(1, keepdims=True)
    region = lambda v: np.einsum("nk,...nkg->...ng", w, v[..., np.maximum(nb, 0), :])  # noqa: E731
    lo, hi = np.quantile(region(samples), [0.05, 0.95], axis=0)
    rt = region(truth)
    return {
        "neighbour_corr": float(np.mean([corr(s - mean) for s in samples[:5]])),
        "neighbour_corr_true": corr(truth - mean),
        "region_coverage_90": float(((rt >= lo) & (rt <= hi)).mean()),
    }


def structure(sdata, pred_key: str) -> dict:
    """Downstream fidelity of the mean and of one sample; the better of the two under each metric's own name."""
    out = {}
    has_samples = "samples" in sdata.tables[pred_key].obsm  # a smoothed prediction keeps none: its mean only
    for which, sample in (("mean", None), ("sample", 0 if has_samples else None)):
        res = stemst.tl.structure_metrics(sdata, pred_key=pred_key, sample=sample)
        out.update({f"{k}_{which}": v for k, v in res.items()})
    for k, higher in STRUCTURE.items():
        pair = [out[f"{k}_mean"], out[f"{k}_sample"]]
        out[k] = float(np.nanmax(pair) if higher else np.nanmin(pair))
    return out


def run_split(
    sdata, train: list[str], test: str, *, key: str, ctx: str, n_genes: int, fit_kwargs: dict, curve: bool
) -> dict:
    """Fit every method on ``train``, predict ``test``, evaluate."""
    genes = stemst.pp.select_genes(sdata, train_sections=train, n_genes=n_genes, inplace=False)
    rows, timings, preds = {}, {}, {}

    t0 = time.perf_counter()
    model = stemst.tl.fit(sdata, genes=genes, sections=train, progress=False, **fit_kwargs)  # defaults: context
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    preds["stemst"] = stemst.tl.predict(
        model,
        sdata,
        sections=test,
        key_added=f"stemst_{test}",
        progress=False,
        n_samples=N_SAMPLES,
        sampler=SAMPLER,
        steps=SAMPLER_STEPS,
    )
    t_pred = time.perf_counter() - t0
    ood = dict(sdata.tables[preds["stemst"]].uns.get("stemst_ood", {}).get(test, {}))
    nfe = N_SAMPLES * len(step_grid(SAMPLER, model.module.diffusion.n_steps, SAMPLER_STEPS))
    timings["stemst"] = {"fit_s": t_fit, "predict_s": t_pred, "nfe_per_spot": nfe, "peak_rss_mb": peak_rss_mb()}

    t0 = time.perf_counter()  # the joint neighbourhood model (issue 9, item 2), beside the per-spot default
    joint = stemst.tl.fit(
        sdata, genes=genes, sections=train, progress=False, architecture="neighbourhood", **fit_kwargs
    )
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    preds["stemst_joint"] = stemst.tl.predict(
        joint, sdata, sections=test, key_added=f"joint_{test}", progress=False, n_samples=N_SAMPLES, steps=SAMPLER_STEPS
    )
    timings["stemst_joint"] = {
        "fit_s": t_fit,
        "predict_s": time.perf_counter() - t0,
        "nfe_per_spot": timings["stemst"]["nfe_per_spot"],
        "peak_rss_mb": peak_rss_mb(),
    }
    for name, (method, kw, features) in BASELINES.items():
        noise = {"noise": "gauss"} if name in NOISY else {}
        t0 = time.perf_counter()
        base = stemst.tl.fit_baseline(
            sdata,
            method=method,
            embedding_key=ctx if features == "context" else key,
            genes=genes,
            sections=train,
            progress=False,
            **kw,
            **noise,
        )
        t_fit = time.perf_counter() - t0
        variants = {name: base.mean_model if noise else base}
        if noise:  # the same mean, three noise models fitted on the held-out section's residuals
            variants.update({f"{name}+{k}": base.with_noise(k) for k in NOISE_KINDS})
        for vname, variant in variants.items():
            t0 = time.perf_counter()
            preds[vname] = stemst.tl.predict(
                variant,
                sdata,
                sections=test,
                key_added=f"{vname.replace('+', '_')}_{test}",
                progress=False,
                n_samples=N_SAMPLES,
            )
            timings[vname] = {
                "fit_s": t_fit,
                "predict_s": time.perf_counter() - t0,
                "nfe_per_spot": 1,
                "peak_rss_mb": peak_rss_mb(),
            }
    # post-hoc spatial smoothing of the best-featured ridge: the cheap competitor of spatial modelling
    preds["ridge_cv+ctx+smooth"] = stemst.tl.smooth(sdata, preds["ridge_cv+ctx"], key_added=f"smooth_{test}")
    timings["ridge_cv+ctx+smooth"] = dict(timings["ridge_cv+ctx"])
    preds["library_size (yardstick)"] = stemst.tl.library_size_yardstick(
        sdata, train_sections=train, test_sections=[test], genes=genes, key_added=f"libsize_{test}"
    )
    timings["library_size (yardstick)"] = {
        "fit_s": 0.0,
        "predict_s": 0.0,
        "nfe_per_spot": 0,
        "peak_rss_mb": peak_rss_mb(),
    }
    table = stemst.tl.compare(sdata, list(preds.values()), names=list(preds), key_added=None)
    for name in preds:
        row = {m: _num(table.loc[name].get(m)) for m in table.columns if m not in ("method", "transform", "pred_key")}
        rows[name] = {
            **row,
            **timings[name],
            **spatial_calibration(sdata, preds[name]),
            **structure(sdata, preds[name]),
        }
    out = {
        "train": train,
        "test": test,
        "n_genes": len(genes),
        "genes": genes,
        "methods": rows,
        "model": repr(model),
        "model_params": {k: _jsonable(v) for k, v in model.params().items()},
        "model_choices": {k: model.training.get(k) for k in ("validation", "head", "early_stopping", "calibration")},
        "ood_warned": bool(ood.get("warned", False)),
        "ood": ood,
    }
    if test not in C_SECTIONS:
        out["cross_patient"] = cross_patient_record(sdata, model, test, ood)
    if curve:
        out["sampling_curve"] = sampling_curve(sdata, model, test)
    for k in preds.values():
        del sdata.tables[k]
    return out


def cross_patient_record(sdata, model, test: str, ood: dict, *, ks=ADAPT_SPOTS) -> dict:
    """The new-patient story of a split: the OOD summary, and the model adapted on 0, 5, ... measured spots.

    ``stemst.tl.adaptation_curve``: for each ``k``, ``k`` spots of ``test`` drawn with seed 0, the model adapted on
    them (``stemst.tl.adapt``) and scored on the other spots (``k = 0``: the model as trained, every spot).
    """
    curve = stemst.tl.adaptation_curve(
        model, sdata, section=test, n_measured=ks, n_samples=N_SAMPLES, rng=0, sampler=SAMPLER, steps=SAMPLER_STEPS
    )
    keys = ("n_measured", "n_scored", "mean_pearson", "mse", "coverage_50", "coverage_90")
    return {
        "section": test,
        "ood": {"warned": bool(ood.get("warned", False)), "fraction_ood": _num(ood.get("fraction_ood"))},
        "adaptation": [{k: row[k] for k in keys} for row in curve.to_dict("records")],
    }


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _jsonable(v):
    return v if isinstance(v, str | int | float | bool | type(None)) else str(v)


def sampling_curve(sdata, model, test: str, *, n_samples: int = 10) -> list[dict]:
    """Mean Pearson and RVD against sampler and number of steps, on the same trained model."""
    table = sdata.tables["table"]
    mask = (table.obs["section"] == test).to_numpy()
    X = np.asarray(table[mask].obsm[model.embedding_key], np.float32)
    y = stemst.tl._data.get_targets(table[mask], model.genes, model.transform)
    rows = []
    settings = [("ancestral", 1000)] + [(s, n) for s in ("ddim", "dpmpp_2m") for n in (5, 10, 25, 50, 100)]
    for sampler, steps in settings:
        t0 = time.perf_counter()
        samples = model.sample(X, n_samples=n_samples, sampler=sampler, steps=steps, rng=0, progress=False)
        dt = time.perf_counter() - t0
        mean = samples.mean(0)
        r = pearson_per_gene(mean, y)
        rows.append(
            {
                "sampler": sampler,
                "steps": steps,
                "mean_pearson": float(np.nanmean(r)),
                "rvd": float(relative_variance_distance(mean, y)),
                "seconds": dt,
                "spots_per_s": len(X) / dt,
            }
        )
    return rows


def summarise(splits: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per split and method rows, and the mean over the leave-one-section-out splits."""
    records = []
    for s in splits:
        for method, row in s["methods"].items():
            records.append(
                {"split": f"{'+'.join(s['train'])} -> {s['test']}", "test": s["test"], "method": method, **row}
            )
    df = pd.DataFrame(records)
    loso = df[df["test"].isin(C_SECTIONS)]
    mean = loso.drop(columns=["split", "test"]).groupby("method", sort=False).mean(numeric_only=True)
    return df, mean


README = HERE.parent / "README.md"
README_MARKERS = ("<!-- her2st-table -->", "<!-- /her2st-table -->")
README_ROWS = {
    "stemst": "**stemst** (defaults; 20 samples x 25 DPM-Solver++ steps)",
    "stemst_joint": "stemst, joint neighbourhood model (`architecture='neighbourhood'`)",
    "mlp+ctx+gauss": "MLP + per-gene Gaussian noise",
    "mlp+ctx+mvn": "MLP + multivariate Gaussian noise (Ledoit-Wolf)",
    "mlp+ctx+resid": "MLP + resampled residual vectors",
    "ridge_cv+ctx+gauss": "ridge + per-gene Gaussian noise",
    "ridge_cv+ctx+mvn": "ridge + multivariate Gaussian noise (Ledoit-Wolf)",
    "ridge_cv+ctx+resid": "ridge + resampled residual vectors",
    "mlp+ctx": "MLP, same features (point prediction)",
    "ridge_cv+ctx": "ridge, CV penalty, same features (point prediction)",
    "ridge_cv+ctx+smooth": "ridge, same features, + spatial smoothing",
    "knn+ctx": "kNN (k = 50), same features",
    "ridge_cv": "ridge, CV penalty, own patch only",
    "knn": "kNN (k = 50), own patch only",
    "ridge_hest": "ridge, HEST-Benchmark penalty, own patch only",
    "library_size (yardstick)": "library-size yardstick (reads the test spot's depth; not a method)",
}
#: README columns: (header, metric, format); the first ones are where methods differ
README_COLUMNS = (
    ("CRPS", "crps", "{:.3f}"),
    ("energy score", "energy_score", "{:.2f}"),
    ("variogram score", "variogram_score", "{:.4f}"),
    ("coverage 50% / 90%", ("coverage_50", "coverage_90"), "{:.2f}"),
    ("domain ARI", "domain_ari", "{:.2f}"),
    ("Moran's I ρ", "moran_spearman", "{:.2f}"),
    ("gene-gene corr. distance", "gene_corr_distance", "{:.3f}"),
    ("r, normalised", "mean_pearson_norm", "{:.3f}"),
    ("mean Pearson", "mean_pearson", "{:.3f}"),
)


def _cell(row, metric, fmt: str) -> str:
    metrics = metric if isinstance(metric, tuple) else (metric,)
    values = [row.get(m, np.nan) for m in metrics]
    if any(v is None or pd.isna(v) for v in values):
        return "-"
    return " / ".join(fmt.format(v) for v in values)


def write_readme(result: dict, df: pd.DataFrame, mean: pd.DataFrame) -> None:
    """Replace the README's results table (between its markers) with this run's numbers."""
    text = README.read_text()
    start, stop = (text.index(m) for m in README_MARKERS)
    a1 = df[df["test"] == "A1"].set_index("method")
    lines = [
        README_MARKERS[0],
        f"`{result['command']}` ({result['total_seconds'] / 60:.0f} min on {result['machine']}, {result['date']}; "
        "tables in `docs/benchmarks_her2st.md`). HER2ST, 100-gene panel chosen on the training sections, "
        "the default embeddings (EfficientNet-Lite0 stage statistics, 8 views), log2(count + 1). Mean over "
        "leave-one-section-out C2-C6, and mean Pearson on the cross-patient split C2-C6 -> A1. CRPS, energy and "
        "variogram scores (lower is better) are computed from 20 samples per spot for every method (one for a "
        "point prediction); the noise of the probabilistic baselines is fitted on the same held-out training "
        "section that stemst calibrates on. Structure columns: the better of the mean and one sample.",
        "",
        "| method | " + " | ".join(h for h, _, _ in README_COLUMNS) + " | A1 mean Pearson |",
        "|---" * (len(README_COLUMNS) + 2) + "|",
    ]
    for name, label in README_ROWS.items():
        if name not in mean.index:
            continue
        row = mean.loc[name]
        cells = [_cell(row, metric, fmt) for _, metric, fmt in README_COLUMNS]
        r_a1 = f"{a1.loc[name, 'mean_pearson']:.3f}" if name in a1.index else "-"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {r_a1} |")
    README.write_text(text[:start] + "\n".join(lines) + "\n" + text[stop:])


def write_docs(result: dict, df: pd.DataFrame, mean: pd.DataFrame) -> None:
    """Markdown tables for the docs, and the README's table."""
    write_readme(result, df, mean)
    cols = [c for c in METRICS + ["fit_s", "predict_s", "nfe_per_spot", "peak_rss_mb"] if c in df.columns]
    df = df.copy()
    df["nfe_per_spot"] = df["nfe_per_spot"].astype(int).astype(str)
    mean = mean.copy()
    mean["nfe_per_spot"] = mean["nfe_per_spot"].astype(int).astype(str)
    lines = [
        "## HER2ST: stemst against baselines",
        "",
        f"Measured with `{result['command']}` on {result['machine']} ({result['date']}); raw numbers in "
        "`benchmarks/results/her2st.json`. Target log2(count + 1) of a "
        f"{result['n_genes']}-gene HMHVG panel chosen on the training sections of each split; embeddings "
        f"`{result['encoder']}`, each spot's own embedding the mean of its 8 flips/rotations. `+ctx`: the baseline "
        "takes the same features as stemst (own + mean of ring-1 + mean of ring-2 neighbours, "
        "`stemst.pp.spatial_context`); `+smooth`: its predictions blended 50/50 with their ring-1 neighbours' "
        "(`stemst.tl.smooth`). stemst runs with the package defaults (residual diffusion around a reduced-rank "
        "ridge head, one training section held out for early stopping and calibration). `_norm` metrics use "
        "library-normalised values; the library-size row reads each test spot's measured depth, so it is a "
        "yardstick, not a method. Coverage: fraction of measured values inside the central 50/80/90/95% sample "
        "interval (deterministic methods: none); `rvd_samples`: RVD of single samples rather than of their mean; "
        "`neighbour_corr`: correlation between ring-1 neighbours of the samples' deviations from the mean (the "
        "measured values' is in the JSON as `neighbour_corr_true`, 0.14-0.20); `region_coverage_90`: 90% interval "
        "coverage of the mean over each spot and its ring-1 neighbours. `stemst_joint`: `architecture='neighbourhood'`. "
        "`nfe_per_spot`: network evaluations per spot (stemst: 20 samples x 25 DPM-Solver++ steps); `peak_rss_mb`: "
        "peak memory of the whole benchmark process up to that point. Proper scores from the samples of every "
        "method (`stemst.metrics`; lower is better): `crps` (per gene, fair estimator; `crps_counts` on the count "
        "scale), `energy_score` (the panel per spot), `variogram_score` (order 0.5 over ring-1 neighbour pairs). "
        "`+gauss` / `+mvn` / `+resid`: the baseline's mean plus a per-gene Gaussian, a Ledoit-Wolf multivariate "
        "Gaussian, or resampled residual vectors, fitted on the residuals on the training section stemst holds out "
        "(`fit_baseline(noise=...)`). Structure (`stemst.tl.structure_metrics`, counts -> normalize_total -> log1p "
        "as a scanpy user would): `domain_ari` (k-means, 5 domains, against the measured ones), `moran_spearman` "
        "(Moran's I across genes against the measured), `svg_overlap` (top-20 spatially variable genes), "
        "`gene_corr_distance` (RMS difference of gene-gene correlations; lower is better); each the better of the "
        "predicted counts (`_mean` in the JSON) and one sample (`_sample`).",
        "",
        f"### Leave-one-section-out over C2-C6, mean of {len([x for x in result['splits'] if x['test'] in C_SECTIONS])} "
        "split(s)" + ("" if result["complete"] else " (partial run: the remaining splits did not finish)"),
        "",
        markdown_table(mean[[c for c in cols if c in mean.columns]]),
        "",
        "### Every split",
        "",
        markdown_table(df.set_index(["split", "method"])[cols].reset_index(level=0), index=True),
        "",
    ]
    lines += cross_patient_lines(result)
    curves = [(s["test"], row) for s in result["splits"] for row in s.get("sampling_curve", [])]
    if curves:
        c = pd.DataFrame([{"test": t, **r} for t, r in curves])
        agg = c.groupby(["sampler", "steps"], sort=False)[["mean_pearson", "rvd", "spots_per_s"]].mean()
        agg = agg.reset_index().set_index("sampler")
        agg["steps"] = agg["steps"].astype(int).astype(str)
        lines += [
            "### Sampling curve (one trained model, split C2-C5 -> C6)",
            "",
            "Mean per-gene Pearson of the 10-sample mean and RVD, for the 1000-step ancestral sampler of the paper and "
            "the fast samplers at 5-100 steps, all on the same trained network.",
            "",
            markdown_table(agg),
            "",
        ]
    DOCS.write_text("\n".join(lines))


def cross_patient_lines(result: dict) -> list[str]:
    """Markdown: the OOD warning of every split, and the cross-patient adaptation curve."""
    splits = [s for s in result["splits"] if "ood_warned" in s]
    if not splits:
        return []
    lines = [
        "### Shift diagnostics and few-shot adaptation",
        "",
        "Out-of-distribution warning of `stemst.tl.predict` per split (a section is warned about when more than half "
        "of its spots score above 1; about 5% of held-out training spots do):",
        "",
        "| test section | share of spots out of distribution | warned |",
        "|---|---|---|",
    ]
    for s in splits:
        frac = s.get("ood", {}).get("fraction_ood")
        lines.append(
            f"| {s['test']} | {'-' if frac is None else f'{frac:.2f}'} | {'yes' if s['ood_warned'] else 'no'} |"
        )
    cross = result.get("cross_patient")
    if cross:
        lines += [
            "",
            f"Cross-patient section {cross['section']}: the model adapted (`stemst.tl.adapt`) on k measured spots "
            "(drawn with seed 0) and scored on the other spots of the section (k = 0: the model as trained, every "
            "spot).",
            "",
            markdown_table(pd.DataFrame(cross["adaptation"]).set_index("n_measured")),
        ]
    return [*lines, ""]


def write_results(args, splits: list[dict], sdata, key: str, t_start: float) -> pd.DataFrame:
    """Write the JSON and the docs table for the splits done so far (called after every split)."""
    command = "python benchmarks/her2st.py"
    for flag, default in (("tests", [*C_SECTIONS, "A1"]), ("steps", None), ("genes", 100)):
        value = getattr(args, flag)
        if value != default:
            command += f" --{flag} " + (" ".join(value) if isinstance(value, list) else str(value))
    result = {
        "command": command,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU only",
        "date": time.strftime("%Y-%m-%d"),
        "encoder": args.encoder,
        "n_genes": args.genes,
        "total_seconds": time.perf_counter() - t_start,
        "embedding": sdata.tables["table"].uns["stemst"]["embeddings"][key],
        "splits": splits,
        "complete": len(splits) == len(args.tests),
    }
    df, mean = summarise(splits)
    result["loso_mean"] = {m: {k: _num(v) for k, v in row.items()} for m, row in mean.iterrows()}
    result["cross_patient"] = next((s["cross_patient"] for s in splits if "cross_patient" in s), None)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "her2st.json").write_text(json.dumps(result, indent=1, default=_jsonable))
    write_docs(result, df, mean)
    return mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="efficientnet_lite0")
    parser.add_argument("--genes", type=int, default=100)
    parser.add_argument("--tests", nargs="*", default=[*C_SECTIONS, "A1"], help="test sections (splits) to run")
    parser.add_argument("--steps", type=int, default=None, help="training steps for stemst (default: package default)")
    parser.add_argument("--no-curve", action="store_true", help="skip the sampling curve")
    parser.add_argument("--curve-on", default="C6", help="test section of the split that gets the sampling curve")
    parser.add_argument("--table-only", action="store_true", help="rebuild the docs tables from the JSON")
    args = parser.parse_args()
    if args.table_only:
        result = json.loads((RESULTS / "her2st.json").read_text())
        write_docs(result, *summarise(result["splits"]))
        return
    t_start = time.perf_counter()
    sdata = stemst.datasets.her2st([*C_SECTIONS, "A1"])
    key = embed(sdata, args.encoder, RESULTS / "cache" / "embeddings")
    ctx = stemst.pp.spatial_context(sdata, embedding_key=key)
    fit_kwargs = {} if args.steps is None else {"steps": args.steps}
    splits = []
    for test in args.tests:
        train = [s for s in C_SECTIONS if s != test]
        t0 = time.perf_counter()
        splits.append(
            run_split(
                sdata,
                train,
                test,
                key=key,
                ctx=ctx,
                n_genes=args.genes,
                fit_kwargs=fit_kwargs,
                curve=not args.no_curve and test == args.curve_on,
            )
        )
        print(f"split -> {test}: {time.perf_counter() - t0:.0f} s", flush=True)
        for m, row in splits[-1]["methods"].items():
            print(
                f"  {m:28s} r={row.get('mean_pearson', float('nan')):.3f} "
                f"rvd={row.get('rvd', float('nan')):.3f} mse={row.get('mse', float('nan')):.3f}",
                flush=True,
            )
        mean = write_results(args, splits, sdata, key, t_start)
    print(markdown_table(mean[[c for c in METRICS if c in mean.columns]]))
    print(f"wrote {RESULTS / 'her2st.json'} and {DOCS} in {(time.perf_counter() - t_start) / 60:.1f} min")


if __name__ == "__main__":
    main()

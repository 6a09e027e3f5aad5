"""Command line: ``stemst demo`` runs the main job end to end on real data."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

TRAIN = ("C2", "C3", "C4", "C5")
TEST = "C6"


def _say(msg: str) -> None:
    print(f"[stemst {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def demo(out: Path, *, n_genes: int = 100, steps: int | None = None, quick: bool = False) -> dict:
    """Train on HER2ST C2-C5, predict C6, compare with baselines, save figures and a metrics table in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import stemst
    from stemst._utils import markdown_table

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _say("Loading HER2ST sections C2-C6 (Andersson et al. 2021)")
    sdata = stemst.datasets.her2st((*TRAIN, TEST))
    stemst.pl.sections(sdata, save=out / "sections.png")
    _say(f"Overview of the sections and their spots: {out / 'sections.png'}")

    _say("Embedding spot-centred patches (EfficientNet-Lite0, 8 flips/rotations each)")
    stemst.pp.embed_patches(sdata, augment=not quick)
    key = stemst.pp.spatial_context(sdata)  # own patch (mean of its views) + ring-1 + ring-2 neighbours
    stemst.pp.select_genes(sdata, train_sections=list(TRAIN), n_genes=n_genes)

    _say("Training the diffusion model on C2-C5 (one section held out for early stopping and calibration)")
    fit_kwargs = {} if steps is None else {"steps": steps}
    model = stemst.tl.fit(sdata, embedding_key=key, sections=list(TRAIN), **fit_kwargs)
    model.save(out / "model", overwrite=True)
    stemst.pl.training_curve(model, save=out / "training_curve.png")

    _say("Predicting C6 and fitting the baselines")
    keys = [stemst.tl.predict(model, sdata, sections=TEST, n_samples=20)]
    for method in ("ridge", "knn", "mlp"):  # the same features: own patch + spatial context
        base = stemst.tl.fit_baseline(sdata, method=method, sections=list(TRAIN), embedding_key=key)
        keys.append(stemst.tl.predict(base, sdata, sections=TEST))
    keys.append(stemst.tl.smooth(sdata, keys[1], weight=0.5))  # ridge + post-hoc spatial smoothing
    keys.append(
        stemst.tl.library_size_yardstick(sdata, train_sections=list(TRAIN), test_sections=[TEST], genes=model.genes)
    )
    table = stemst.tl.compare(sdata, pred_keys=keys)
    table.to_csv(out / "metrics.csv")
    (out / "metrics.md").write_text(markdown_table(table) + "\n")

    genes = stemst.tl.evaluate(sdata, pred_key=keys[0]).per_gene.sort_values("pearson", ascending=False).index[:4]
    stemst.pl.expression_maps(sdata, list(genes), pred_key=keys[0], section=TEST, save=out / "expression_maps.png")
    stemst.pl.uncertainty_map(sdata, list(genes[:2]), pred_key=keys[0], section=TEST, save=out / "uncertainty.png")
    stemst.pl.variation_curves(sdata, pred_key=keys[0], save=out / "variation_curves.png")
    stemst.pl.gene_correlation(sdata, pred_keys=keys[:-1], save=out / "gene_correlation.png")
    elapsed = time.perf_counter() - t0
    _say(f"Done in {elapsed / 60:.1f} min. Metrics (test section {TEST}, panel chosen on {', '.join(TRAIN)}):")
    shown = ["mean_pearson", "pcc_50", "mse", "rvd", "rvd_samples", "coverage_50", "coverage_90", "mean_pearson_norm"]
    print(table[[c for c in shown if c in table.columns]].to_string(float_format=lambda v: f"{v:.3f}"), flush=True)
    _say("Library-size row: each gene predicted from the test spot's own measured depth (a yardstick, not a method).")
    _say(f"Figures, metrics.csv, metrics.md and the trained model are in {out.resolve()}")
    return {"elapsed_s": elapsed, "out": str(out)}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``stemst`` command."""
    parser = argparse.ArgumentParser(prog="stemst", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train on HER2ST C2-C5, predict C6, evaluate and plot")
    p.add_argument("--out", type=Path, default=Path("stemst_output"), help="output folder (default: stemst_output)")
    p.add_argument("--genes", type=int, default=100, help="panel size (default: 100)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the model's CPU default)")
    p.add_argument("--quick", action="store_true", help="no augmentation: a faster, less accurate run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        result = demo(args.out, n_genes=args.genes, steps=args.steps, quick=args.quick)
        (args.out / "run.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

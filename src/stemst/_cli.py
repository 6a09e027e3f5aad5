"""Command line.

- ``stemst demo``: the main job end to end on real data (HER2ST).
- ``stemst prepare STORE.zarr``: embed patches, add the spatial context and choose the gene panel, in the store.
- ``stemst fit STORE.zarr --out MODEL``: train on a prepared store and save the model.
- ``stemst predict STORE.zarr --model MODEL``: sample the sections of a prepared store into a prediction table in it.

All three run as they are under ``torchrun`` (``torchrun --nproc_per_node=N -m stemst fit ...``): ``prepare`` and
``predict`` share the sections among the processes, ``fit`` trains with DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from pathlib import Path

TRAIN = ("C2", "C3", "C4", "C5")
TEST = "C6"


def _say(msg: str) -> None:
    print(f"[stemst {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def demo(out: Path, *, n_genes: int = 100, steps: int | None = None, quick: bool = False, cache: bool = True) -> dict:
    """Train on HER2ST C2-C5, predict C6, compare with baselines, save figures and a metrics table in ``out``.

    The embeddings are cached (:func:`stemst.pp.embed_patches`), so a second run skips the encoder; ``cache=False``
    embeds again without reading or writing the cache.
    """
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
    stemst.pp.embed_patches(sdata, augment=not quick, cache=cache)
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
    shown = [
        "mean_pearson",
        "mse",
        "crps",
        "energy_score",
        "coverage_50",
        "coverage_90",
        "mean_pearson_norm",
        "rvd_samples",
    ]
    print(table[[c for c in shown if c in table.columns]].to_string(float_format=lambda v: f"{v:.3f}"), flush=True)
    _say("Library-size row: each gene predicted from the test spot's own measured depth (a yardstick, not a method).")
    _say(f"Figures, metrics.csv, metrics.md and the trained model are in {out.resolve()}")
    return {"elapsed_s": elapsed, "out": str(out)}


def prepare(
    store: Path,
    *,
    train_sections: list[str],
    encoder: str = "efficientnet_lite0",
    augment: bool = True,
    n_genes: int = 100,
    batch_size: int | None = None,
    progress: bool = True,
) -> dict:
    """Embed, add spatial context and choose the panel in a SpatialData zarr store; sections shared among ranks.

    Under torchrun each process embeds every ``world_size``-th section into a cache folder beside the store; rank 0
    then assembles them (cache hits: neither the encoder nor the patches are read again) with the context and the
    panel and writes the table back, so the result is the same as one process's.
    """
    import stemst
    from stemst._schema import TABLE_KEY, embedding_key, get_table
    from stemst._schema import sections as list_sections
    from stemst.io._store import write_table
    from stemst.model import distributed

    distributed.init()
    rank, world = distributed.rank(), distributed.world_size()
    sdata = stemst.io.read_zarr(store)
    sections = list_sections(get_table(sdata))
    parts = store.parent / f".{store.name}.embeddings"
    kwargs = {"encoder": encoder, "augment": augment, "batch_size": batch_size, "cache": parts}
    mine = sections[rank::world]
    if world > 1 and mine:
        _say(f"rank {rank}/{world}: embedding {', '.join(mine)}")
        stemst.pp.embed_patches(sdata, sections=mine, progress=progress, **kwargs)
    distributed.barrier()
    result: dict = {"store": str(store), "sections": sections, "world_size": world}
    if distributed.is_main():
        # with several processes every section is in the cache now, each checked against its pixels by the
        # process that embedded it: rank 0 reads the files without reading the patches a second time
        stemst.pp.embed_patches(sdata, progress=progress and world == 1, verify_cache=world == 1, **kwargs)
        key = stemst.pp.spatial_context(sdata, embedding_key=embedding_key(encoder), use_views=augment)
        stemst.pp.select_genes(sdata, train_sections=train_sections, n_genes=n_genes)
        write_table(sdata, TABLE_KEY)  # the old table stays whole until the new one is
        result["context_key"] = key
        _say(f"Wrote the embeddings ({key}) and the {n_genes}-gene panel to {store}")
    distributed.barrier()
    return result


def fit(store: Path, out: Path, *, fit_kwargs: dict, overwrite: bool = False) -> dict:
    """Train on a prepared store (``stemst prepare``) and save the model to ``out`` (rank 0 writes).

    ``out`` is checked before training: an existing model without ``overwrite``, a file, or a folder that cannot be
    written is refused at once instead of after the training.
    """
    import stemst
    from stemst._atomic import check_destination
    from stemst.model import distributed

    distributed.init()
    if out.exists() and not overwrite:
        raise SystemExit(f"stemst fit: {out} exists; pass --overwrite to replace it.")
    check_destination(out, what="the model", argument="--out")
    sdata = stemst.io.read_zarr(store)
    t0 = time.perf_counter()
    model = stemst.tl.fit(sdata, **fit_kwargs)
    elapsed = time.perf_counter() - t0
    if distributed.is_main():
        model.save(out, overwrite=overwrite)
        _say(
            f"Trained {model.training.get('steps_trained')} steps in {elapsed:.1f} s on "
            f"{distributed.world_size()} process(es); model saved to {out}"
        )
    distributed.barrier()
    return {"out": str(out), "elapsed_s": elapsed, "world_size": distributed.world_size()}


def section_seed(seed: int, index: int) -> int:
    """Seed of the section at ``index`` (its position among the store's sections) for the run seeded ``seed``.

    Examples
    --------
    >>> section_seed(0, 3) == section_seed(0, 3) != section_seed(0, 4)
    True
    """
    import numpy as np

    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def predict(
    store: Path,
    model_dir: Path,
    *,
    sections: list[str] | None = None,
    n_samples: int = 20,
    key_added: str | None = None,
    seed: int = 0,
    device: str = "auto",
    keep_samples: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Sample a saved model's predictions for the sections of a prepared store and write them into the store.

    Every section is sampled on its own, seeded by :func:`section_seed` from ``seed`` and its position in the store,
    so the table does not depend on how many processes made it. Under torchrun each process predicts every
    ``world_size``-th section (on its own GPU when there are several) into a folder beside the store; rank 0 then
    writes them, in the store's section order, as one table (the layout of :func:`stemst.tl.predict`).
    """
    import shutil

    import anndata as ad
    import pandas as pd

    import stemst
    from stemst._schema import PREDICTION_KEY, SECTION_KEY, UNS_KEY, check_table_key_free, get_table
    from stemst._schema import sections as list_sections
    from stemst._torch import resolve_device
    from stemst.io._store import write_table
    from stemst.model import distributed
    from stemst.tl._predict import as_spatialdata_table

    distributed.init()
    dev = distributed.device(resolve_device(device))  # a device this machine lacks is named before any work
    rank, world = distributed.rank(), distributed.world_size()
    sdata = stemst.io.read_zarr(store)
    table = get_table(sdata)
    known = list_sections(table)
    chosen = known if not sections else list(sections)
    unknown = [s for s in chosen if s not in known]
    if unknown:
        raise SystemExit(f"stemst predict: unknown sections {unknown}; the store has {known}.")
    key = key_added or PREDICTION_KEY
    check_table_key_free(sdata, key, overwrite=overwrite)
    model = stemst.tl.StemstModel.load(model_dir, device=dev)
    parts = store.parent / f".{store.name}.{key}.parts"
    mine = chosen[rank::world]
    t0 = time.perf_counter()
    tables = {}
    for s in mine:
        i = known.index(s)
        out = stemst.tl.predict(
            model,
            table,
            sections=s,
            n_samples=n_samples,
            keep_samples=keep_samples,
            rng=section_seed(seed, i),
            progress=progress and world == 1,
        )
        if world > 1:
            parts.mkdir(parents=True, exist_ok=True)
            out.write_h5ad(parts / f"{i:06d}.h5ad")
        else:
            tables[s] = out
    if world > 1:
        _say(f"rank {rank}/{world}: predicted {', '.join(mine) or 'no section'} in {time.perf_counter() - t0:.1f} s")
    distributed.barrier()
    result = {"store": str(store), "key": key, "sections": chosen, "world_size": world}
    if distributed.is_main():
        if world > 1:
            tables = {s: ad.read_h5ad(parts / f"{known.index(s):06d}.h5ad") for s in chosen}
        merged = ad.concat([tables[s] for s in chosen], merge="same")
        merged.obs[SECTION_KEY] = pd.Categorical(merged.obs[SECTION_KEY].astype(str), categories=chosen)
        merged.uns[PREDICTION_KEY] = {
            **{k: v for k, v in tables[chosen[0]].uns[PREDICTION_KEY].items() if k != "rng"},
            "rng": int(seed),
            "seeds": "per section: stemst._cli.section_seed(rng, position among the store's sections)",
        }
        if "sections" in table.uns.get(UNS_KEY, {}):
            merged.uns[UNS_KEY] = {"sections": table.uns[UNS_KEY]["sections"]}
        sdata.tables[key] = as_spatialdata_table(merged)
        write_table(sdata, key)  # an earlier prediction stays whole until the new one is
        shutil.rmtree(parts, ignore_errors=True)
        _say(
            f"Wrote {merged.n_obs} spots x {merged.n_vars} genes ({n_samples} samples each) to {store} as table {key!r}"
        )
    distributed.barrier()
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``stemst`` command.

    An error prints its message (``stemst <command>: error: ...``) to stderr and returns 1; ``--verbose`` also
    prints the traceback and the package's progress log.
    """
    parser = argparse.ArgumentParser(prog="stemst", description=__doc__)
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument(
        "--verbose", "-v", action="store_true", help="print the progress log, and the full traceback of an error"
    )
    parser.add_argument("--verbose", "-v", dest="verbose_all", action="store_true", help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", parents=[verbose], help="train on HER2ST C2-C5, predict C6, evaluate and plot")
    p.add_argument("--out", type=Path, default=Path("stemst_output"), help="output folder (default: stemst_output)")
    p.add_argument("--genes", type=int, default=100, help="panel size (default: 100)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the model's CPU default)")
    p.add_argument("--quick", action="store_true", help="no augmentation: a faster, less accurate run")
    p.add_argument(
        "--no-cache",
        dest="cache",
        action="store_false",
        help="embed the patches again instead of reading them from the embedding cache ($STEMST_CACHE_DIR or the "
        "user cache folder), and do not write it",
    )
    p = sub.add_parser(
        "prepare", parents=[verbose], help="embed, add spatial context and choose the panel in a zarr store"
    )
    p.add_argument("store", type=Path, help="SpatialData .zarr store in the stemst layout (stemst.io.write_zarr)")
    p.add_argument("--train-sections", nargs="+", required=True, help="sections the gene panel is chosen on")
    p.add_argument("--encoder", default="efficientnet_lite0", help="encoder (stemst.pp.list_encoders)")
    p.add_argument("--no-augment", action="store_true", help="embed the original patch only (no 8 views)")
    p.add_argument("--genes", type=int, default=100, help="panel size (default: 100)")
    p.add_argument("--batch-size", type=int, default=None, help="images per encoder pass (default: by device)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p = sub.add_parser(
        "fit", parents=[verbose], help="train on a prepared zarr store and save the model (runs under torchrun)"
    )
    p.add_argument("store", type=Path, help="prepared SpatialData .zarr store (stemst prepare)")
    p.add_argument("--out", type=Path, required=True, help="model folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    p.add_argument("--sections", nargs="+", default=None, help="training sections (default: all)")
    p.add_argument("--embedding-key", default=None, help="obsm key (default: the context features)")
    p.add_argument(
        "--architecture", default="auto", help="auto (mlp, the measured default), mlp, transformer, neighbourhood"
    )
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the model's)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch, split across processes")
    p.add_argument("--validation", default="auto", help="held-out section, 'auto' (the last) or 'none'")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the draws")
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="folder for checkpoint.pt")
    p.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p = sub.add_parser(
        "predict",
        parents=[verbose],
        help="sample a saved model's predictions into a prepared store (runs under torchrun)",
    )
    p.add_argument("store", type=Path, help="prepared SpatialData .zarr store (stemst prepare)")
    p.add_argument("--model", type=Path, required=True, help="model folder (stemst fit --out)")
    p.add_argument("--sections", nargs="+", default=None, help="sections to predict (default: all)")
    p.add_argument("--samples", type=int, default=20, help="samples per spot (default: 20)")
    p.add_argument("--key-added", default=None, help="name of the prediction table (default: stemst_prediction)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (each section gets its own from it)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available; under torchrun cuda:LOCAL_RANK), cpu")
    p.add_argument("--keep-samples", action="store_true", help="store the samples in obsm['samples']")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prediction table")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    args.verbose = args.verbose or args.verbose_all
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("stemst").setLevel(logging.INFO)
    try:
        _run(args)
    except Exception as e:  # noqa: BLE001 - any failure: its message for the user, the traceback with --verbose
        if args.verbose:
            traceback.print_exc()
        hint = "" if args.verbose else " (--verbose prints the traceback)"
        print(f"stemst {args.command}: error: {type(e).__name__}: {e}{hint}", file=sys.stderr, flush=True)
        return 1
    return 0


def _run(args: argparse.Namespace) -> None:
    """Run the command ``args`` ask for."""
    if args.command == "demo":
        result = demo(args.out, n_genes=args.genes, steps=args.steps, quick=args.quick, cache=args.cache)
        (args.out / "run.json").write_text(json.dumps(result, indent=2))
    elif args.command == "prepare":
        prepare(
            args.store,
            train_sections=args.train_sections,
            encoder=args.encoder,
            augment=not args.no_augment,
            n_genes=args.genes,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )
    elif args.command == "fit":
        fit_kwargs = {
            "sections": args.sections,
            "embedding_key": args.embedding_key,
            "architecture": args.architecture,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "validation": None if args.validation == "none" else args.validation,
            "rng": args.seed,
            "checkpoint_dir": args.checkpoint_dir,
            "training": {"checkpoint_every": args.checkpoint_every},
            "resume": args.resume,
            "progress": not args.no_progress,
        }
        fit(args.store, args.out, fit_kwargs=fit_kwargs, overwrite=args.overwrite)
    elif args.command == "predict":
        predict(
            args.store,
            args.model,
            sections=args.sections,
            n_samples=args.samples,
            key_added=args.key_added,
            seed=args.seed,
            device=args.device,
            keep_samples=args.keep_samples,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )


if __name__ == "__main__":
    sys.exit(main())

"""Nothing lost (issue 23): overwrites are write-new-then-swap, destinations are checked before long work, and no
``key_added`` replaces data the function does not own. The claims of docs/guarantees.md, each tested here.

Interruptions are real: a child process is killed (SIGKILL) in the middle of each overwrite, then the result on disk
is read back; the moments inside the swap itself are crashed in-process at each rename.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import stemst
from stemst import _atomic
from stemst._cli import fit as cli_fit
from stemst._cli import predict as cli_predict
from stemst._cli import prepare as cli_prepare
from stemst._errors import StemstDataError, StemstFileError, StemstWarning
from stemst._schema import assemble, make_section
from stemst.io._store import table_swap
from stemst.tl import StemstModel

MODEL_V1 = Path(__file__).parent / "data" / "model_v1"  # 6 genes g0-g5 from a 4-d obsm["X_test"]
GENES = [f"g{i}" for i in range(6)]
PRED = "stemst_prediction"


def tiny_sdata(seed: int = 0, sections: tuple[str, ...] = ("S1",)):
    """Sections of 10 spots x 6 genes on a 64 px noise image, with the 4-d ``obsm["X_test"]`` model_v1 reads."""
    rng = np.random.default_rng(seed)
    parts = [
        make_section(
            s,
            image=rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
            counts=rng.poisson(3, (10, len(GENES))),
            genes=GENES,
            spot_ids=[f"{s}_{i}" for i in range(10)],
            coords=rng.uniform(8, 56, (10, 2)),
            microns_per_pixel=2.0,  # 128 µm across: room for the default 112 µm patches
            spot_diameter_um=10.0,
        )
        for s in sections
    ]
    sdata = assemble(parts)
    sdata.tables["table"].obsm["X_test"] = rng.normal(size=(10 * len(sections), 4)).astype(np.float32)
    return sdata


def counts(store: Path) -> np.ndarray:
    return stemst.io.read_zarr(store).tables["table"].X.toarray()


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The weights of the model saved at ``path``, as :meth:`StemstModel.load` reads them."""
    return StemstModel.load(path, device="cpu").module.state_dict()


def new_model() -> StemstModel:
    """model_v1 with other weights: the "new" result of a model overwrite."""
    model = StemstModel.load(MODEL_V1, device="cpu")
    with torch.no_grad():
        for p in model.module.parameters():
            p.add_(1.0)
    return model


@pytest.fixture
def prepared(tmp_path) -> Path:
    """A tiny store with model_v1's embeddings, predicted once with seed 0."""
    store = tmp_path / "s.zarr"
    stemst.io.write_zarr(tiny_sdata(), store)
    cli_predict(store, MODEL_V1, n_samples=2, seed=0, device="cpu", progress=False)
    return store


def prediction(store: Path) -> np.ndarray:
    return stemst.io.read_zarr(store).tables[PRED].layers["std"]


def embeddings(store: Path) -> dict[str, np.ndarray]:
    """What ``stemst prepare`` adds to the counts table."""
    return dict(stemst.io.read_zarr(store).tables["table"].obsm)


def assert_same(a, b) -> None:
    """``a`` and ``b`` are the same array, or the same dict of arrays (tensors included)."""
    a, b = (x if isinstance(x, dict) else {"": x} for x in (a, b))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def prepare(store: Path) -> None:
    cli_prepare(store, train_sections=["S1"], encoder="color_stats", augment=False, n_genes=3, progress=False)


# ------------------------------------------------------------------------------------------------------------------
# killed in the middle of each overwrite: the old result is there, whole; the next call removes the half-written one

CHILD = """
import sys, threading, time, traceback
from pathlib import Path
import dask, torch, zarr
import stemst
from stemst._cli import predict
sys.path.insert(0, {tests!r})
from test_atomic import MODEL_V1, new_model, prepare, tiny_sdata

FLAGS = Path({flags!r})
dask.config.set(scheduler="synchronous")  # every zarr array is created in the thread that writes it
local = threading.local()

def stall():  # tell the test this overwrite is in the middle of its write, then wait to be killed
    (FLAGS / local.kind).write_text("writing")
    time.sleep(600)

create_array = zarr.Group.create_array
def halfway_array(self, *args, **kwargs):  # the 5th zarr array of the new store or table is never written
    local.calls = getattr(local, "calls", 0) + 1
    if local.calls == 5:
        stall()
    return create_array(self, *args, **kwargs)
zarr.Group.create_array = halfway_array

def halfway_save(obj, f, *args, **kwargs):  # half a weights file
    Path(f).write_bytes(b"PK half")
    stall()
torch.save = halfway_save

writes = {{
    "store": lambda: stemst.io.write_zarr(tiny_sdata(seed=1), {store!r}, overwrite=True),
    "model": lambda: new_model().save({model!r}, overwrite=True),
    "prediction": lambda: predict(
        Path({prediction!r}), MODEL_V1, n_samples=2, seed=1, overwrite=True, device="cpu", progress=False
    ),
    "prepare": lambda: prepare(Path({prepare!r})),
}}

def run(kind):
    local.kind = kind
    try:
        writes[kind]()
    except BaseException:
        (FLAGS / (kind + ".error")).write_text(traceback.format_exc())

threads = [threading.Thread(target=run, args=(kind,), daemon=True) for kind in writes]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


def kill_mid_write(tmp_path: Path, **targets: Path) -> None:
    """Overwrite ``targets`` (store, model, prediction) in one child process, one thread each, and SIGKILL it once
    every overwrite is in the middle of its write (one child: its imports are the test's cost)."""
    flags = tmp_path / "flags"
    flags.mkdir()
    code = CHILD.format(tests=str(Path(__file__).parent), flags=str(flags), **{k: str(v) for k, v in targets.items()})
    src = str(Path(stemst.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    log = tmp_path / "child.log"
    with open(log, "w") as out:
        child = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 240
        while len(list(flags.iterdir())) < len(targets):
            assert child.poll() is None, f"the child ended before stalling:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the child never reached the middle of every write"
            time.sleep(0.1)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    errors = {f.name: f.read_text() for f in flags.glob("*.error")}
    assert not errors, errors
    assert child.returncode == -signal.SIGKILL


def test_killed_in_the_middle_of_each_overwrite_leaves_the_old_results_whole(tmp_path, prepared):
    store, model, table = tmp_path / "other.zarr", tmp_path / "model", tmp_path / "to_prepare.zarr"
    stemst.io.write_zarr(tiny_sdata(seed=2), store)
    StemstModel.load(MODEL_V1, device="cpu").save(model)
    shutil.copytree(prepared, table)
    reads = {"store": (counts, store), "model": (weights, model), "prediction": (prediction, prepared)}
    reads["prepare"] = (embeddings, table)
    old = {kind: read(target) for kind, (read, target) in reads.items()}
    kill_mid_write(tmp_path, store=store, model=model, prediction=prepared, prepare=table)
    half = {"store": _atomic.Swap.of(store).new, "model": _atomic.Swap.of(model).new}
    half |= {"prediction": table_swap(prepared, PRED).new, "prepare": table_swap(table, "table").new}
    # the next call reads the old result, whole; it finds the half-written new one, names it and deletes it
    for kind, (read, target) in reads.items():
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            assert_same(read(target), old[kind])
        leftover = [
            str(w.message) for w in said if w.category is StemstWarning and "interrupted write" in str(w.message)
        ]
        assert len(leftover) == 1 and str(half[kind]) in leftover[0] and f"kept {target}" in leftover[0]
        assert not half[kind].exists()


# ------------------------------------------------------------------------------------------------------------------
# a crash inside the swap itself, at each step: the next call finds a whole result (the new one, once it is complete)


class Crash(BaseException):
    """Stands for a kill: nothing in stemst catches it, so no clean-up runs."""


def crash_at(monkeypatch, step: str, swap: _atomic.Swap) -> None:
    """Crash the next replacement of ``swap.final`` at ``step``: after the old result is moved aside (``"aside"``),
    or once the new one is in place but before the old one is deleted (``"placed"``)."""
    replace, rmtree = os.replace, shutil.rmtree

    def crashing_replace(src, dst):
        if step == "aside" and Path(dst) == swap.final:
            raise Crash
        return replace(src, dst)

    def crashing_rmtree(path, *args, **kwargs):
        if step == "placed" and Path(path) == swap.old:
            raise Crash
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(_atomic.os, "replace", crashing_replace)
    monkeypatch.setattr(_atomic.shutil, "rmtree", crashing_rmtree)


@pytest.mark.parametrize("step", ["aside", "placed"])
@pytest.mark.parametrize("kind", ["store", "model", "prediction", "prepare"])
def test_crash_during_the_swap_is_recovered_by_the_next_call(kind, step, tmp_path, prepared, monkeypatch):
    if kind == "store":
        swap, read = _atomic.Swap.of(prepared), counts
        new = tiny_sdata(seed=1).tables["table"].X.toarray()

        def write():
            stemst.io.write_zarr(tiny_sdata(seed=1), prepared, overwrite=True)
    elif kind == "model":
        target = tmp_path / "model"
        StemstModel.load(MODEL_V1, device="cpu").save(target)
        swap, read, model = _atomic.Swap.of(target), weights, new_model()
        new = {k: v.detach().cpu() for k, v in model.module.state_dict().items()}

        def write():
            model.save(target, overwrite=True)
    elif kind == "prediction":
        swap, read = table_swap(prepared, PRED), prediction
        ref = tmp_path / "ref.zarr"
        shutil.copytree(prepared, ref)
        cli_predict(ref, MODEL_V1, n_samples=2, seed=1, overwrite=True, device="cpu", progress=False)
        new = prediction(ref)

        def write():
            cli_predict(prepared, MODEL_V1, n_samples=2, seed=1, overwrite=True, device="cpu", progress=False)
    else:
        swap, read = table_swap(prepared, "table"), embeddings
        ref = tmp_path / "ref.zarr"
        shutil.copytree(prepared, ref)
        prepare(ref)
        new = embeddings(ref)

        def write():
            prepare(prepared)

    crash_at(monkeypatch, step, swap)
    with pytest.raises(Crash):
        write()
    monkeypatch.undo()
    assert swap.old.exists() and swap.final.exists() == (step == "placed")  # "aside": nothing at the final path
    with pytest.warns(StemstWarning, match=f"interrupted write of {swap.final}"):
        again = read(swap.final.parents[1] if swap.inner else swap.final)
    assert_same(again, new)
    assert not swap.leftovers()


def test_leftover_of_an_interrupted_first_write_is_named_and_removed(tmp_path):
    half = _atomic.Swap.of(tmp_path / "s.zarr").new
    half.mkdir()
    (half / "zarr.json").write_text("{")
    with (
        pytest.warns(StemstWarning, match=re.escape(f"{half}. Recovered: nothing was at {tmp_path / 's.zarr'}")),
        pytest.raises(FileNotFoundError, match=r"s\.zarr does not exist"),
    ):
        stemst.io.read_zarr(tmp_path / "s.zarr")
    assert not half.exists()


def test_overwrite_refusals_leave_the_store(tmp_path, prepared):
    before = counts(prepared)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        stemst.io.write_zarr(tiny_sdata(seed=1), prepared)
    with pytest.raises(StemstDataError, match="reads its images from it"):  # lazily backed by the store itself
        stemst.io.write_zarr(stemst.io.read_zarr(prepared), prepared, overwrite=True)
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(StemstFileError, match="not a zarr store"):
        stemst.io.write_zarr(tiny_sdata(), folder, overwrite=True)
    assert (folder / "keep.txt").read_text() == "mine"
    np.testing.assert_array_equal(counts(prepared), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "s.zarr"]  # no leftovers


# ------------------------------------------------------------------------------------------------------------------
# destinations checked before long work


def test_embedding_cache_that_is_a_file_is_refused_before_embedding(tmp_path, monkeypatch):
    sdata = tiny_sdata()
    (tmp_path / "cache").write_text("not a folder")
    monkeypatch.setattr("stemst.pp._embed._Embedder.__call__", lambda *a, **k: pytest.fail("the encoder ran"))
    for cache in (tmp_path / "cache", tmp_path / "cache" / "sub"):
        with pytest.raises(StemstDataError, match=re.escape(f"cache='{tmp_path / 'cache'}") + ".*(is a file|under it)"):
            stemst.pp.embed_patches(sdata, encoder="color_stats", cache=cache, progress=False)
    assert list(sdata.tables["table"].obsm) == ["spatial", "X_test"]


def test_model_destinations_checked_before_training(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    locked = Path("/proc")  # not even root can make a folder there; elsewhere, a read-only folder
    if not locked.is_dir():
        (locked := tmp_path / "read-only").mkdir(mode=0o500)
    under_file, unwritable = tmp_path / "file" / "model", locked / "stemst-test" / "model"
    store = tmp_path / "never-read.zarr"  # checked first: the store is not even opened
    for out, match in (
        (under_file, ".* is a file, so no folder can be created"),
        (unwritable, re.escape(f"cannot write in {locked}")),
    ):
        with pytest.raises(StemstDataError, match=re.escape(f"--out='{out}': ") + match):
            cli_fit(store, out, fit_kwargs={})
        with pytest.raises(StemstDataError, match=re.escape(f"path='{out}': ") + match):
            StemstModel.load(MODEL_V1, device="cpu").save(out)
    monkeypatch.setattr("stemst.tl._fit._collect", lambda *a, **k: pytest.fail("the data was read"))
    with pytest.raises(StemstDataError, match=re.escape(f"checkpoint_dir='{under_file}'")):
        stemst.tl.fit(tiny_sdata(), embedding_key="X_test", checkpoint_dir=under_file, progress=False)


# ------------------------------------------------------------------------------------------------------------------
# a store that lost the chunks of its counts


@pytest.mark.parametrize("array", ["data", "indices", "indptr"])
def test_store_missing_counts_chunks_is_refused_naming_it(tmp_path, array):
    store = tmp_path / "s.zarr"
    stemst.io.write_zarr(tiny_sdata(), store)
    shutil.rmtree(store / "tables" / "table" / "X" / array / "c")
    with pytest.raises(StemstFileError, match=rf"s\.zarr: the counts of table 'table' are incomplete: X/{array}"):
        stemst.io.read_zarr(store)
    with pytest.raises(StemstFileError, match="incomplete"):
        stemst.io.read_zarr(store, check=False)


# ------------------------------------------------------------------------------------------------------------------
# refused keys: nothing a function does not own is replaced, and a refusal changes nothing


def test_yardstick_and_smooth_never_replace_the_counts_table():
    sdata = tiny_sdata(sections=("S1", "S2"))
    before = sdata.tables["table"].X.toarray()
    kw = {"train_sections": "S1", "test_sections": "S2", "genes": GENES}
    with pytest.raises(StemstDataError, match="destroy the raw counts"):
        stemst.tl.library_size_yardstick(sdata, key_added="table", **kw)
    key = stemst.tl.library_size_yardstick(sdata, **kw)
    first = sdata.tables[key].X.copy()
    with pytest.raises(StemstDataError, match="already exists; pass overwrite=True"):
        stemst.tl.library_size_yardstick(sdata, train_sections="S2", test_sections="S1", genes=GENES)
    np.testing.assert_array_equal(sdata.tables[key].X, first)
    stemst.tl.library_size_yardstick(sdata, train_sections="S2", test_sections="S1", genes=GENES, overwrite=True)
    assert list(sdata.tables[key].obs["section"].unique()) == ["S1"]
    with pytest.raises(StemstDataError, match="destroy the raw counts"):
        stemst.tl.smooth(sdata, key, key_added="table", overwrite=True)
    assert sorted(sdata.tables) == [key, "table"]
    np.testing.assert_array_equal(sdata.tables["table"].X.toarray(), before)


def test_embed_patches_replaces_only_its_own_obsm_keys():
    sdata = tiny_sdata()
    table = sdata.tables["table"]
    centres, user = table.obsm["spatial"].copy(), table.obsm["X_test"].copy()
    kw = {"encoder": "color_stats", "cache": False, "progress": False}
    for key, match in (("spatial", "the spot centres"), ("X_test", "did not write")):
        with pytest.raises(StemstDataError, match=f"key_added='{key}'.*{match}"):
            stemst.pp.embed_patches(sdata, key_added=key, **kw)
    table.obsm["mine_views"] = user
    with pytest.raises(StemstDataError, match="key_added='mine_views'"):  # the views would land on a user's array
        stemst.pp.embed_patches(sdata, key_added="mine", **kw)
    np.testing.assert_array_equal(table.obsm["spatial"], centres)
    np.testing.assert_array_equal(table.obsm["X_test"], user)
    stemst.pp.embed_patches(sdata, augment=False, **kw)
    first = table.obsm["X_color_stats"].copy()
    stemst.pp.embed_patches(sdata, augment=True, **kw)  # its own keys: embedded again, the views added
    np.testing.assert_array_equal(table.obsm["X_color_stats"], first)
    assert table.obsm["X_color_stats_views"].shape[:2] == (10, 8)
    key = stemst.pp.spatial_context(sdata, embedding_key="X_color_stats", use_views=False)
    with pytest.raises(StemstDataError, match=f"key_added='{key}'"):  # context features are spatial_context's
        stemst.pp.embed_patches(sdata, key_added=key, **kw)


def test_select_genes_replaces_only_its_own_panel():
    table = tiny_sdata().tables["table"]
    table.var["highly_variable"] = np.arange(6) % 2 == 0
    n_sections = table.var["n_sections"].copy()
    for key, match in (("n_sections", "measured"), ("highly_variable", "did not write"), ("stemst", "metadata")):
        with pytest.raises(StemstDataError, match=f"key_added='{key}'.*{match}"):
            stemst.pp.select_genes(table, train_sections="S1", genes=["g0"], key_added=key)
    assert table.var["n_sections"].equals(n_sections) and table.var["highly_variable"].sum() == 3
    assert "sections" in table.uns["stemst"] and "panel" not in table.uns["stemst"]
    for key in ("stemst_panel", "panel_b"):  # an earlier panel of the same name is replaced
        stemst.pp.select_genes(table, train_sections="S1", genes=["g0"], key_added=key)
        stemst.pp.select_genes(table, train_sections="S1", genes=["g1", "g2"], key_added=key)
        assert table.var_names[table.var[key]].tolist() == ["g1", "g2"]

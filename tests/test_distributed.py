"""Training under ``torchrun`` with 2 CPU processes (gloo) equals one process with the same global batch and seed."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import stemst
from stemst._cli import predict, prepare, section_seed
from stemst.model import distributed

TORCHRUN = Path(sys.executable).with_name("torchrun")
# C2 (186 spots) held out: the calibration runs on every process, so keep it small
FIT = ["--embedding-key", "X_color_stats_context", "--batch-size", "48", "--seed", "3", "--validation", "C2"]
FIT += ["--no-progress"]


@pytest.fixture(scope="module")
def raw_store(data_dir, tmp_path_factory):
    """Two real sections (C2, C6) as a zarr store, not yet embedded."""
    path = tmp_path_factory.mktemp("ddp") / "raw.zarr"
    stemst.io.write_zarr(stemst.datasets.her2st(["C2", "C6"], cache_dir=data_dir), path)
    return path


def _torchrun(runs: list[list[str]], tmp_path: Path, preamble: str = "") -> str:
    """Run ``stemst`` command lines one after the other in the same 2 torchrun processes (imports paid once)."""
    script = tmp_path / "runs.py"
    script.write_text(f"{preamble}from stemst._cli import main\nfor argv in {runs!r}:\n    main(argv)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(script)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / "weights.pt", map_location="cpu", weights_only=True)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-4, msg=k)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this python")
def test_two_processes_prepare_train_and_resume_like_one(raw_store, tmp_path, monkeypatch):
    one, two = tmp_path / "one.zarr", tmp_path / "two.zarr"
    # the held-out section C2 in 3 chunks: under torchrun the processes share the early-stopping evaluation
    monkeypatch.setattr("stemst.model.recipe.EVAL_CHUNK", 64)
    chunks = "import stemst.model.recipe\nstemst.model.recipe.EVAL_CHUNK = 64\n"
    shutil.copytree(raw_store, one)
    shutil.copytree(raw_store, two)
    # one process, in this one: prepare (cheap colour embeddings, 8 views), 10 steps with a checkpoint, resume to 20
    prepare(one, train_sections=["C2", "C6"], encoder="color_stats", n_genes=16, progress=False)
    sdata = stemst.io.read_zarr(one)
    kw = {"embedding_key": "X_color_stats_context", "batch_size": 48, "rng": 3, "validation": "C2", "progress": False}
    kw |= {"checkpoint_dir": tmp_path / "ref_ckpt", "training": {"checkpoint_every": 5}}
    stemst.tl.fit(sdata, steps=10, **kw).save(tmp_path / "ref10")
    stemst.tl.fit(sdata, steps=20, resume=True, **kw).save(tmp_path / "ref20")

    # two processes under torchrun (gloo): each embeds one section; each computes half of every batch
    ckpt = tmp_path / "ckpt"
    common = [*FIT, "--checkpoint-dir", str(ckpt), "--checkpoint-every", "5"]
    runs = [
        ["prepare", str(two), "--train-sections", "C2", "C6", "--encoder", "color_stats", "--genes", "16"],
        ["fit", str(two), "--out", str(tmp_path / "m10"), "--steps", "10", *common],
        ["fit", str(two), "--out", str(tmp_path / "m20"), "--steps", "20", "--resume", *common],
        # each process samples one section with the one-process model; rank 0 writes the table
        ["predict", str(two), "--model", str(tmp_path / "ref20"), "--samples", "3", "--seed", "5", "--no-progress"],
    ]
    said = _torchrun(runs, tmp_path, preamble=chunks)
    assert not list(tmp_path.glob(".two.zarr.*parts*"))  # the per-process files are cleaned up
    # the processes agree on the order of the sections, so each takes a different one
    for rank, section in ((0, "C2"), (1, "C6")):
        assert f"rank {rank}/2: embedding {section}" in said and f"rank {rank}/2: predicted {section} " in said
    assert (ckpt / "checkpoint.pt").exists()

    a, b = stemst.io.read_zarr(one).tables["table"], stemst.io.read_zarr(two).tables["table"]
    for key in ("X_color_stats", "X_color_stats_views", "X_color_stats_context"):
        np.testing.assert_array_equal(a.obsm[key], b.obsm[key])
    assert a.var["stemst_panel"].equals(b.var["stemst_panel"]) and 14 <= a.var["stemst_panel"].sum() <= 18
    np.testing.assert_array_equal(a.obs["stemst_patch_clipped"], b.obs["stemst_patch_clipped"])
    _assert_same(_weights(tmp_path / "ref10"), _weights(tmp_path / "m10"))
    _assert_same(_weights(tmp_path / "ref20"), _weights(tmp_path / "m20"))
    config = json.loads((tmp_path / "m20" / "config.json").read_text())
    ref = json.loads((tmp_path / "ref20" / "config.json").read_text())
    np.testing.assert_allclose(
        [h["loss"] for h in config["history"]], [h["loss"] for h in ref["history"]], rtol=1e-4, atol=1e-5
    )
    assert config["history"][-1]["step"] > 10  # the resumed run went on training
    # the calibration: 3 chunks of C2 shared by the 2 processes, the same scales as one process drew
    cal, cal_ref = (stemst.tl.StemstModel.load(tmp_path / m).training["calibration"] for m in ("m20", "ref20"))
    assert cal["n_spots"] == cal["n_held_out"] > 2 * 64 and cal["spread_median"] == pytest.approx(
        cal_ref["spread_median"], rel=1e-5
    )
    torch.testing.assert_close(_weights(tmp_path / "m20")["spread"], _weights(tmp_path / "ref20")["spread"])
    held_out = [h["val_mse"] for h in config["history"] if "val_mse" in h]
    assert len(held_out) >= 2
    np.testing.assert_allclose(held_out, [h["val_mse"] for h in ref["history"] if "val_mse" in h], rtol=1e-5)

    # prediction: one process writes the same table as two, and each section as tl.predict seeded per section
    predict(one, tmp_path / "ref20", n_samples=3, seed=5, progress=False)
    p1, p2 = (stemst.io.read_zarr(z).tables["stemst_prediction"] for z in (one, two))
    assert p1.shape == (a.n_obs, a.var["stemst_panel"].sum()) and list(p1.obs["section"].cat.categories) == ["C2", "C6"]
    assert p1.obs_names.equals(a.obs_names) and (p1.layers["std"] > 0).mean() > 0.9
    np.testing.assert_allclose(p2.X, p1.X, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p2.layers["std"], p1.layers["std"], rtol=1e-4, atol=1e-5)
    model = stemst.tl.StemstModel.load(tmp_path / "ref20", device="cpu")
    c6 = stemst.tl.predict(model, a, sections="C6", n_samples=3, rng=section_seed(5, 1), progress=False)
    np.testing.assert_array_equal(p1[p1.obs["section"] == "C6"].layers["std"], c6.layers["std"])
    with pytest.raises(SystemExit, match="unknown sections"):
        predict(one, tmp_path / "ref20", sections=["C9"], progress=False)
    with pytest.raises(stemst.StemstError, match="overwrite"):
        predict(one, tmp_path / "ref20", progress=False)
    w10, w20 = _weights(tmp_path / "m10"), _weights(tmp_path / "m20")
    assert any(not torch.equal(w10[k], w20[k]) for k in w10 if k.startswith("net."))


def test_distributed_is_a_no_op_in_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init() is False
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.shard(7) == slice(0, 7)
    module = torch.nn.Linear(2, 2)
    assert distributed.wrap(module, torch.device("cpu")) is module


def test_world_size_without_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="launch with torchrun"):
        distributed.init()


def test_shards_cover_the_batch(monkeypatch):
    # the rows of a batch split over 3 processes: contiguous, disjoint, complete, sizes within 1
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    parts = []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        parts.append(distributed.shard(10))
    rows = np.concatenate([np.arange(10)[p] for p in parts])
    assert rows.tolist() == list(range(10))
    assert {p.stop - p.start for p in parts} <= {3, 4}


def test_rows_of_a_batch_make_up_the_whole_loss():
    # the loss of two halves, drawn with the whole batch's randomness, equals the loss of the whole batch
    from stemst.model import DiffusionModel, NetworkConfig

    torch.manual_seed(0)
    m = DiffusionModel(6, 4, NetworkConfig(width=16, depth=1))
    cond, y = torch.randn(10, 4), torch.rand(10, 6)
    m.set_statistics(cond, y)
    m.train()
    whole, _ = m.loss(y, cond, generator=torch.Generator().manual_seed(1))
    halves = [
        m.loss(y, cond, generator=torch.Generator().manual_seed(1), rows=s)[0] for s in (slice(0, 4), slice(4, 10))
    ]
    torch.testing.assert_close(torch.cat(halves), whole)

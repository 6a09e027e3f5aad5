"""The GPU path (marked ``gpu``; skipped without CUDA): embedding in bf16, the transformer, sampling."""

import numpy as np
import pytest
import torch

import stemst

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_auto_architecture_is_the_mlp_on_cpu(her2st_small, sdata_copy):
    sdata = sdata_copy(her2st_small)
    stemst.pp.embed_patches(sdata, encoder="color_stats", augment=False, progress=False)
    stemst.pp.select_genes(sdata, train_sections=["C2"], n_genes=12)
    m = stemst.tl.fit(
        sdata, embedding_key="X_color_stats", sections="C2", steps=3, validation=None, device="cpu", progress=False
    )
    assert m.module.network.architecture == "mlp"


@pytest.mark.gpu
@cuda
def test_gpu_embed_fit_transformer_and_sample(her2st_small, sdata_copy):
    sdata = sdata_copy(her2st_small)
    stemst.pp.embed_patches(sdata, augment=False, device="cuda", progress=False)
    table = her2st_small.tables["table"].copy()
    cpu = sdata_copy(her2st_small, table)
    stemst.pp.embed_patches(cpu, sections="C2", augment=False, device="cpu", progress=False)
    c2 = (table.obs["section"] == "C2").to_numpy()
    a = sdata.tables["table"].obsm["X_efficientnet_lite0"][c2]
    b = cpu.tables["table"].obsm["X_efficientnet_lite0"][c2]
    # bf16 autocast on the GPU: the same features up to bf16 precision
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99
    stemst.pp.spatial_context(sdata)
    stemst.pp.select_genes(sdata, train_sections=["C2"], n_genes=50)
    m = stemst.tl.fit(
        sdata,
        sections="C2",
        steps=200,
        architecture="transformer",
        network={"depth": 2, "width": 128, "heads": 4},
        progress=False,
    )
    assert m.module.network.architecture == "transformer" and m.module.device.type == "cuda"
    key = stemst.tl.predict(m, sdata, sections="C6", n_samples=10, progress=False)
    res = stemst.tl.evaluate(sdata, pred_key=key, key_added=None).summary
    assert np.isfinite(res["mean_pearson"]) and res["mean_pearson"] > 0.1

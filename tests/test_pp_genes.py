import logging

import numpy as np
import pytest

import stemst
from stemst._schema import StemstDataError
from stemst.pp import select_genes
from stemst.pp._genes import hmhvg_intersection

TRAIN = ["C2", "C3", "C4", "C5"]


@pytest.fixture
def table(her2st_c):
    return her2st_c.tables["table"].copy()


def test_hmhvg_intersection_matches_brute_force():
    rng = np.random.default_rng(0)
    mean = rng.gamma(1.0, size=500)
    std = mean * rng.uniform(0.5, 2.0, size=500)
    for target in (10, 50, 200):
        idx, n = hmhvg_intersection(mean, std, target)
        top_mean, top_std = set(np.argsort(-mean)[:n]), set(np.argsort(-std)[:n])
        assert set(idx.tolist()) == top_mean & top_std
        sizes = [len(set(np.argsort(-mean)[:k]) & set(np.argsort(-std)[:k])) for k in range(1, 501)]
        best = min(abs(s - target) for s in sizes)
        assert abs(len(idx) - target) == best  # no N gets closer to the target
        assert np.all(np.diff(mean[idx]) <= 0)  # ordered by decreasing mean


def test_hmhvg_panel_on_training_sections(table):
    select_genes(table, train_sections=TRAIN, n_genes=100)
    panel = table.var_names[table.var["stemst_panel"].to_numpy()].tolist()
    assert 90 <= len(panel) <= 110
    assert not any(g.upper().startswith(("MT-", "RPS", "RPL")) for g in panel)
    params = table.uns["stemst_panel"]
    assert params["method"] == "hmhvg" and params["train_sections"] == TRAIN and params["n_genes"] == len(panel)
    assert params["genes"] == select_genes(table, train_sections=TRAIN, n_genes=100, inplace=False)
    assert table.uns["stemst"]["panel"]["train_sections"] == TRAIN
    # genes are highly expressed and variable on the pooled training counts
    x = table[table.obs["section"].isin(TRAIN).to_numpy()].X
    mean = np.asarray(x.mean(0)).ravel()
    chosen = table.var["stemst_panel"].to_numpy()
    assert np.median(mean[chosen]) > np.quantile(mean, 0.99)
    # choosing on the test section too changes the panel: the record says which sections were used
    other = select_genes(table, train_sections="all", n_genes=100, inplace=False)
    assert set(other) != set(panel)


def test_hvg_panel(table):
    genes = select_genes(table, train_sections=TRAIN, method="hvg", n_genes=150, inplace=False)
    assert len(genes) == 150 and len(set(genes)) == 150
    assert not any(g.upper().startswith(("MT-", "RPS", "RPL")) for g in genes)
    assert "stemst_panel" not in table.var  # inplace=False writes nothing


def test_all_sections_warns_about_leakage(table, caplog):
    with caplog.at_level(logging.WARNING, logger="stemst"):
        select_genes(table, train_sections="all", n_genes=50)
    assert "leaks" in caplog.text
    assert table.uns["stemst_panel"]["train_sections"] == ["C2", "C3", "C4", "C5", "C6"]


def test_panel_gene_missing_from_a_section(table):
    n_all = 5
    partial = table.var_names[(table.var["n_sections"] < n_all).to_numpy()]
    c2 = table[(table.obs["section"] == "C2").to_numpy(), partial].X
    absent_in_c2 = partial[np.asarray(c2.sum(0)).ravel() == 0]
    present_everywhere = table.var_names[(table.var["n_sections"] == n_all).to_numpy()][:3].tolist()
    gene = absent_in_c2[0]
    with pytest.raises(StemstDataError, match=rf"{gene} \(not in \['C2'"):
        select_genes(table, train_sections=TRAIN, genes=[*present_everywhere, gene])
    select_genes(table, train_sections=TRAIN, genes=present_everywhere)
    assert table.var["stemst_panel"].sum() == 3 and table.uns["stemst_panel"]["method"] == "given"
    # chosen panels never contain such genes
    panel = select_genes(table, train_sections=TRAIN, method="hvg", n_genes=300, inplace=False)
    assert not set(panel) & set(absent_in_c2)


def test_bad_arguments(table):
    with pytest.raises(StemstDataError, match="Unknown train_sections"):
        select_genes(table, train_sections=["C9"])
    with pytest.raises(KeyError, match="NOT_A_GENE"):
        select_genes(table, train_sections=TRAIN, genes=["NOT_A_GENE"])
    with pytest.raises(ValueError, match="hmhvg"):
        select_genes(table, train_sections=TRAIN, method="pca")
    with pytest.raises(TypeError):
        select_genes(table, TRAIN)  # keyword-only: the training sections must be named


def test_select_genes_accepts_spatialdata(her2st_small):
    genes = select_genes(her2st_small, train_sections=["C2"], n_genes=50, inplace=False)
    assert 40 <= len(genes) <= 60
    assert "stemst_panel" not in her2st_small.tables["table"].var
    assert isinstance(stemst.pp.transform_counts(her2st_small.tables["table"][:, genes].X), np.ndarray)

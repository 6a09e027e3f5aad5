"""Stain normalisation (Macenko) and HED stain jitter in stemst.pp.embed_patches, on a crop of HER2ST C2."""

import numpy as np
import pytest

import stemst
from stemst._schema import StemstDataError, assemble, make_section
from stemst.pp import Encoder, embed_patches
from stemst.pp._stain import Stains, fit_stains, hed_rescale, normalise_stains

MEAN_RGB = Encoder("mean_rgb", build=lambda: lambda x: x.mean((-2, -1)), input_size=32, mean=(0, 0, 0), std=(1, 1, 1))
KEY = "X_mean_rgb"
#: the crop cuts through the tissue: a few of its spots sit near its edge (a warning about the scale factor)
pytestmark = pytest.mark.filterwarnings(r"ignore:Section '(C2|X)' \(\)")
#: a stain change: haematoxylin x1.25, eosin x0.75 (as benchmarks/stain.py shifts C5)
SHIFT = (1.25, 0.75, 1.0)


def _sdata(c2, image):
    return assemble([make_section("C2", image=image, **{k: v for k, v in c2.items() if k != "image"})])


@pytest.fixture(scope="module")
def c2(her2st_small, section_crop):
    """A 1200 x 1200 px crop of C2 around its centre spot, with the spots that lie in it."""
    return section_crop(her2st_small, "C2", 1200)


def _embed(c2, image, **kw):
    sdata = _sdata(c2, image)
    embed_patches(sdata, encoder=MEAN_RGB, progress=False, cache=False, **{"augment": False, **kw})
    return sdata.tables["table"]


def _angle(a: Stains, b: Stains) -> float:
    """Largest angle in degrees between the two slides' haematoxylin vectors and between their eosin vectors."""
    cos = np.clip((a.vectors * b.vectors).sum(0), -1, 1)
    return float(np.degrees(np.arccos(cos)).max())


def test_stain_norm_moves_a_slides_stains_and_colours_to_the_reference(c2):
    shifted_image = hed_rescale(c2["image"][None], SHIFT)[0]
    plain = _embed(c2, c2["image"], stain_norm=True)
    record = plain.uns["stemst"]["embeddings"][KEY]["stain_norm"]
    reference = Stains.from_dict(record["reference"])
    assert record["method"] == "macenko" and set(record["sections"]) == {"C2"}
    shifted = _embed(c2, shifted_image, stain_norm=record)  # a new slide, normalised to the training reference
    source = Stains.from_dict(shifted.uns["stemst"]["embeddings"][KEY]["stain_norm"]["sections"]["C2"])
    assert _angle(source, reference) > 3  # the shift moved the stain vectors

    tissue = np.moveaxis(shifted_image, 0, -1)[300:900, 300:900]
    restained = normalise_stains(np.moveaxis(tissue, -1, 0)[None], source, reference)
    after = fit_stains(np.moveaxis(restained[0], 0, -1))
    assert _angle(after, reference) < _angle(source, reference) / 3
    np.testing.assert_allclose(after.max_concentration, reference.max_concentration, rtol=0.15)

    # the encoder sees the shifted slide's patches in the reference's colours: far closer than without
    raw_plain, raw_shifted = _embed(c2, c2["image"]).obsm[KEY], _embed(c2, shifted_image).obsm[KEY]
    gap_before = np.abs(raw_shifted - raw_plain).mean()
    gap_after = np.abs(shifted.obsm[KEY] - plain.obsm[KEY]).mean()
    assert gap_before > 0.02 and gap_after < gap_before / 3


def test_stain_jitter_views_differ_from_the_plain_ones_and_keep_shapes(c2):
    plain = _embed(c2, c2["image"], augment=True)
    jittered = _embed(c2, c2["image"], augment=True, stain_jitter=2)
    n = plain.n_obs
    assert plain.obsm[f"{KEY}_views"].shape == (n, 8, 3) and jittered.obsm[f"{KEY}_views"].shape == (n, 24, 3)
    views = jittered.obsm[f"{KEY}_views"]
    np.testing.assert_array_equal(views[:, :8], plain.obsm[f"{KEY}_views"])  # the plain views come first
    np.testing.assert_array_equal(jittered.obsm[KEY], plain.obsm[KEY])
    change = np.abs(views[:, 8:] - np.tile(views[:, :8], (1, 2, 1)))
    assert (change.reshape(n, 16, 3).max(-1) > 1e-3).mean() > 0.9  # (almost) every jittered view differs
    assert change.mean() < 0.05  # ... by a light jitter
    settings = jittered.uns["stemst"]["embeddings"][KEY]
    assert settings["views"] == 24 and settings["stain_jitter"]["copies"] == 2
    again = _embed(c2, c2["image"], augment=True, stain_jitter=2).obsm[f"{KEY}_views"]
    np.testing.assert_array_equal(again, views)  # seeded per section: reproducible (and cacheable)
    # without augment, the jittered copies alone make views
    assert _embed(c2, c2["image"], stain_jitter=1).obsm[f"{KEY}_views"].shape == (n, 2, 3)


def test_stain_options_refuse_bad_input_before_any_work(c2):
    sdata = _sdata(c2, c2["image"])
    before = set(sdata.tables["table"].obsm)
    bad = [
        ({"stain_jitter": -1}, ValueError, "stain_jitter must be a whole number"),
        ({"stain_jitter": 1.5}, ValueError, "stain_jitter must be a whole number"),
        ({"stain_jitter": True}, ValueError, "stain_jitter must be a whole number"),
        ({"stain_norm": "macenko"}, TypeError, "stain_norm must be True/False, a trained model"),
        ({"stain_norm": {"vectors": [[1, 2]], "max_concentration": [1, 1]}}, StemstDataError, "3 x 2"),
        ({"stain_norm": {"reference": {}}}, StemstDataError, "'vectors'"),
        ({"stain_norm": True, "dense": True}, ValueError, "dense=False"),
    ]
    for kw, error, match in bad:
        with pytest.raises(error, match=match):
            embed_patches(sdata, encoder=MEAN_RGB, progress=False, cache=False, **kw)
    assert set(sdata.tables["table"].obsm) == before

    class Untrained:
        encoder = {"encoder": "efficientnet_lite0"}

    with pytest.raises(StemstDataError, match="trained on embeddings made without stain normalisation"):
        embed_patches(sdata, encoder=MEAN_RGB, progress=False, cache=False, stain_norm=Untrained())
    glass = np.random.default_rng(0).integers(236, 256, c2["image"].shape, dtype=np.uint8)  # no stained pixel
    blank = _sdata(c2, glass)
    with pytest.raises(StemstDataError, match="only 0 tissue pixels"):
        embed_patches(blank, encoder=MEAN_RGB, progress=False, cache=False, stain_norm=True)


def test_views_of_another_number_are_refused_for_part_of_a_table(c2):
    """Jittered training sections and a plain new section in one table: the new views would wipe the others'."""
    other = {**c2, "spot_ids": [f"x{i}" for i in range(len(c2["spot_ids"]))]}
    sdata = assemble([make_section(name, **d) for name, d in (("C2", c2), ("X", other))])
    embed_patches(sdata, encoder=MEAN_RGB, progress=False, cache=False, augment=False, stain_jitter=1)
    views = sdata.tables["table"].obsm[f"{KEY}_views"].copy()
    with pytest.raises(StemstDataError, match="holds 2 views per spot and this call would make 8"):
        embed_patches(sdata, encoder=MEAN_RGB, progress=False, cache=False, sections="X")
    np.testing.assert_array_equal(sdata.tables["table"].obsm[f"{KEY}_views"], views)
    embed_patches(sdata, encoder=MEAN_RGB, progress=False, cache=False, sections="X", augment=False, stain_jitter=1)
    assert np.isfinite(sdata.tables["table"].obsm[f"{KEY}_views"]).all()


def test_model_carries_the_reference_to_a_new_slide(c2):
    """The stain reference travels with the encoder settings into the model and back into embed_patches."""
    sdata = _sdata(c2, c2["image"])
    embed_patches(sdata, encoder=MEAN_RGB, progress=False, cache=False, augment=False, stain_norm=True)
    stemst.pp.select_genes(sdata, train_sections=["C2"], n_genes=5)
    fast = {"architecture": "mlp", "steps": 2, "diffusion": {"head_pcs": None}, "validation": None, "progress": False}
    model = stemst.tl.fit(sdata, embedding_key=KEY, sections="C2", **fast)
    recorded = sdata.tables["table"].uns["stemst"]["embeddings"][KEY]["stain_norm"]["reference"]
    assert model.encoder["stain_norm"]["reference"] == recorded
    new = _sdata(c2, hed_rescale(c2["image"][None], SHIFT)[0])
    embed_patches(new, encoder=MEAN_RGB, progress=False, cache=False, augment=False, stain_norm=model)
    assert new.tables["table"].uns["stemst"]["embeddings"][KEY]["stain_norm"]["reference"] == recorded
    key = stemst.tl.predict_image(model, new, "C2", spacing_um=200, encoder=MEAN_RGB, n_samples=2, progress=False)
    grid = new.tables[key.removeprefix("stemst_prediction_") + "_table"]
    assert grid.uns["stemst"]["embeddings"][KEY]["stain_norm"]["reference"] == recorded  # the grid too

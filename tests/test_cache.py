"""Cached steps (opendit.sampling.cache): off or refreshed at every call, the sampler is bit-identical to the plain one;
the schedule of whole calls is the documented one; FORA returns the computed features as they are, TaylorSeer's
forecast is exact for features linear in time; the model comes back unchanged; the flags reach the sampler."""

import pytest
import torch

from opendit.errors import UserError
from opendit.models import DiT
from opendit.sampling.cache import CacheSettings, FeatureCache
from opendit.sampling.generate import generate
from opendit.transport import create_transport

from helpers import perturbed


def tiny() -> DiT:
    torch.manual_seed(0)
    return perturbed(DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                         num_classes=10, learn_sigma=False)).eval()


def inputs(n=4):
    g = torch.Generator().manual_seed(3)
    return torch.arange(n) % 10, torch.randn(n, 1, 8, 8, generator=g)


FLOW = dict(objective=create_transport(), sampler="ode", steps=9, sampling_method="heun")


@pytest.mark.parametrize("method", ["fora", "taylorseer"])
@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_a_cache_refreshed_at_every_call_is_bit_identical_to_no_cache(method, cfg):
    model, (y, z) = tiny(), inputs()
    plain = generate(model, y, z, cfg_scale=cfg, cfg_interval=(0.3, 1.0), **FLOW)
    cache = FeatureCache(CacheSettings(method, interval=1, warmup=1))
    cached = generate(model, y, z, cfg_scale=cfg, cfg_interval=(0.3, 1.0), cache=cache, **FLOW)
    assert torch.equal(plain, cached)
    assert cache.calls == cache.whole == 16  # Heun on 9 points: 8 steps of 2 calls
    assert "forward" not in model.__dict__ and all("forward" not in b.attn.__dict__ for b in model.blocks)
    assert torch.equal(generate(model, y, z, cfg_scale=cfg, **FLOW), generate(model, y, z, cfg_scale=cfg, cache=None,
                                                                              **FLOW))


def test_cached_calls_follow_the_schedule_and_change_the_samples_a_little():
    model, (y, z) = tiny(), inputs()
    plain = generate(model, y, z, cfg_scale=1.0, **FLOW)
    for method in ("fora", "taylorseer"):
        cache = FeatureCache(CacheSettings(method, interval=3, warmup=2))
        out = generate(model, y, z, cfg_scale=1.0, cache=cache, **FLOW)
        # 16 calls: 0, 1 (warm-up), then 4, 7, 10, 13 whole
        assert (cache.calls, cache.whole) == (16, 6)
        diff = (out - plain).abs().max().item()
        assert 0 < diff < 0.2 * plain.abs().max().item(), (method, diff)


def test_a_guidance_interval_edge_refreshes_the_cache():
    """Entering the interval doubles the batch: that call runs whole instead of reusing features of the other batch."""
    model, (y, z) = tiny(), inputs()
    cache = FeatureCache(CacheSettings("fora", interval=100, warmup=1))
    generate(model, y, z, cfg_scale=2.0, cfg_interval=(0.5, 1.0), cache=cache, **FLOW)
    assert cache.whole == 2  # the first call (unguided, batch 4) and the first guided one (batch 8)
    assert cache.calls == 16


def test_fora_reuses_and_taylorseer_forecasts_exactly_for_linear_features():
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    x = torch.zeros(2)
    for method in ("fora", "taylorseer"):
        cache = FeatureCache(CacheSettings(method, interval=3, warmup=2))
        seen = []
        for t in (0.0, 0.1, 0.25, 0.4, 0.5):  # calls 0, 1 whole (warm-up), 2 and 3 cached, 4 whole
            cache.begin_call(x, torch.tensor([t]))
            seen.append((cache.compute, cache.branch("f", lambda t=t: a + b * t)))
        assert [c for c, _ in seen] == [True, True, False, False, True]
        for t, (_, out) in zip((0.25, 0.4), seen[2:4]):
            want = a + b * 0.1 if method == "fora" else a + b * t
            torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


def test_two_whole_calls_at_one_time_keep_the_later_one():
    """Heun evaluates twice at each inner grid time: the forecast must use distinct times."""
    cache = FeatureCache(CacheSettings("taylorseer", interval=1, warmup=1))
    x = torch.zeros(2)
    for t, v in ((0.0, 1.0), (0.5, 2.0), (0.5, 3.0)):
        cache.begin_call(x, torch.tensor([t]))
        cache.branch("f", lambda v=v: torch.tensor(v))
    assert cache.times == [0.0, 0.5] and [f.item() for f in cache.features["f"]] == [1.0, 3.0]


def test_cache_flags_reach_the_sampler_and_the_sample_record():
    from opendit.cli.flags import parse_argv
    from opendit.config import GridConfig
    from opendit.objectives import DiffusionObjective
    from opendit.sampling.load import sampler_settings

    class Loaded:
        objective, source, objective_note, in_channels = DiffusionObjective(), "x.pt", "diffusion", 4

    def settings(argv):
        return sampler_settings(parse_argv(GridConfig, argv), Loaded)

    s = settings(["--ckpt", "x.pt", "--cache_method", "taylorseer", "--cache_interval", "4"])
    assert s["cache"] == CacheSettings("taylorseer", interval=4, warmup=2)
    assert "cache" not in settings(["--ckpt", "x.pt"])
    assert settings(["--ckpt", "x.pt", "--cache_method", "fora"])["cache"] == CacheSettings("fora", interval=3, warmup=2)
    with pytest.raises(UserError, match="add --cache_method"):  # given without a method: not silently ignored
        settings(["--ckpt", "x.pt", "--cache_interval", "4"])
    with pytest.raises(ValueError):
        CacheSettings("deepcache")


def test_routings_nest_and_each_restores_what_it_found():
    from opendit.sampling.routing import forwards_replaced

    model = tiny()
    x, t, y = torch.zeros(2, 1, 8, 8), torch.zeros(2), torch.zeros(2, dtype=torch.long)
    outer = lambda *a, **k: "outer"  # noqa: E731 (an instance's own forward, e.g. a counter's)
    with forwards_replaced([(model, outer)]):
        with FeatureCache(CacheSettings("fora")).attach(model):
            assert model.forward is not outer and "forward" in model.blocks[0].attn.__dict__
            assert model(x, t, y) == "outer"  # the cache's forward wraps the one it found
        assert model.forward is outer and all("forward" not in b.mlp.__dict__ for b in model.blocks)
    assert "forward" not in model.__dict__

import math

import numpy as np
import pytest
import torch

from opendit.models import (
    PUBLISHED_MODELS,
    AttentionBackendError,
    DiT,
    DiT_models,
    sincos_2d,
    timestep_sinusoid,
)
from helpers import perturbed
from reference_dit import reference_forward


def small_dit(**kw) -> DiT:
    args = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=4, num_classes=5)
    args.update(kw)
    return DiT(**args)


# ----------------------------------------------------------------------------- published layout

def expected_xl2_shapes() -> dict:
    """DiT-XL/2 @256 state dict as listed in the facts file."""
    D, T = 1152, 256
    shapes = {
        "pos_embed": (1, T, D),
        "x_embedder.proj.weight": (D, 4, 2, 2),
        "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256),
        "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D),
        "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (1001, D),
        "final_layer.linear.weight": (32, D),
        "final_layer.linear.bias": (32,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D),
        "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    for n in range(28):
        b = f"blocks.{n}."
        shapes.update({
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
            b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,),
            b + "adaLN_modulation.1.weight": (6 * D, D), b + "adaLN_modulation.1.bias": (6 * D,),
        })
    return shapes


def test_xl2_state_dict_is_the_published_layout():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=32)
    sd = model.state_dict()
    expected = expected_xl2_shapes()
    assert len(sd) == 292 == len(expected)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert sum(v.numel() for v in sd.values()) == 675_129_632
    assert not model.pos_embed.requires_grad


def closed_form_param_count(D: int, depth: int, p: int, C: int = 4, classes: int = 1000, tokens: int = 256) -> int:
    per_block = 18 * D * D + 15 * D  # qkv 3D^2+3D, proj D^2+D, fc1 4D^2+4D, fc2 4D^2+D, adaLN 6D^2+6D
    return (
        D * C * p * p + D  # patch embedding
        + 256 * D + D + D * D + D  # timestep MLP
        + (classes + 1) * D  # labels + null class
        + depth * per_block
        + 2 * D * D + 2 * D + D * p * p * 2 * C + p * p * 2 * C  # final layer (learn_sigma)
        + tokens * D  # pos_embed
    )


@pytest.mark.parametrize("name", ["DiT-S/2", "DiT-S/8", "DiT-B/4", "DiT-L/2", "DiT-XL/2", "DiT-XL/8"])
def test_parameter_counts_closed_form(name):
    with torch.device("meta"):
        model = DiT_models[name](input_size=32)
    p = model.patch_size
    expected = closed_form_param_count(model.hidden_size, len(model.blocks), p, tokens=(32 // p) ** 2)
    assert sum(v.numel() for v in model.state_dict().values()) == expected


@pytest.mark.parametrize("size,params_m,with_pos", [("S", 32.9, False), ("B", 130.3, False), ("L", 457.8, False), ("XL", 675.1, True)])
def test_family_parameter_counts_match_the_facts_table(size, params_m, with_pos):
    # The facts table (256 px, patch 2, to 0.1M) counts S, B and L without the frozen pos_embed
    # and XL with it (675.1M; 674.8M without), so the test follows each row as written.
    with torch.device("meta"):
        model = DiT_models[f"DiT-{size}/2"](input_size=32)
    n = sum(v.numel() for k, v in model.state_dict().items() if with_pos or k != "pos_embed")
    assert round(n / 1e6, 1) == params_m


def test_registry_has_the_twelve_published_configs():
    assert len(PUBLISHED_MODELS) == 12
    for name in PUBLISHED_MODELS:
        assert name in DiT_models
    with torch.device("meta"):
        m = DiT_models["DiT-B/4"](input_size=32)
    assert (m.patch_size, len(m.blocks), m.hidden_size, m.num_heads) == (4, 12, 768, 12)


def test_published_style_checkpoint_loads_strict_and_reproduces_outputs(tmp_path):
    src = perturbed(small_dit(), seed=1).eval()
    path = tmp_path / "DiT-tiny.pt"
    torch.save(src.state_dict(), path)  # a bare state dict, like the published files
    dst = small_dit().eval()
    dst.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 900]), torch.tensor([0, 4])
    with torch.no_grad():
        assert torch.equal(src(x, t, y), dst(x, t, y))


# ----------------------------------------------------------------------------- embeddings by hand

def hand_pos_embed(D: int, h: int, w: int) -> np.ndarray:
    quarter = D // 4
    omega = [1.0 / 10000 ** (k / quarter) for k in range(quarter)]
    rows = []
    for r in range(h):
        for c in range(w):  # tokens row-major
            col_part = [math.sin(c * o) for o in omega] + [math.cos(c * o) for o in omega]
            row_part = [math.sin(r * o) for o in omega] + [math.cos(r * o) for o in omega]
            rows.append(col_part + row_part)
    return np.array(rows, dtype=np.float64)


@pytest.mark.parametrize("D,h,w", [(8, 2, 2), (16, 3, 5), (8, 4, 1)])
def test_pos_embed_matches_hand_computation(D, h, w):
    ref = hand_pos_embed(D, h, w)
    np.testing.assert_allclose(sincos_2d(D, (h, w)), ref, rtol=0, atol=1e-12)
    model = DiT(input_size=(2 * h, 2 * w), patch_size=2, in_channels=1, hidden_size=D, depth=1, num_heads=2, num_classes=3)
    assert model.pos_embed.shape == (1, h * w, D)
    # stored as float32: within float32 rounding of values in [-1, 1]
    np.testing.assert_allclose(model.pos_embed[0].double().numpy(), ref, rtol=0, atol=1e-7)


def test_timestep_embedding_matches_hand_computation():
    t = torch.tensor([0.0, 1.0, 17.0, 250.5, 999.0])
    emb = timestep_sinusoid(t, dim=256).double().numpy()
    half = 128
    for i, tv in enumerate(t.tolist()):
        for k in (0, 1, 5, 64, 127):
            f = math.exp(-math.log(10000) * k / half)
            # cos first, then sin. float32 argument t*f carries an absolute error up to ~|t| * 2^-24
            # (~6e-5 at t=999), which is the tolerance on the trig values.
            assert emb[i, k] == pytest.approx(math.cos(tv * f), abs=1e-4)
            assert emb[i, half + k] == pytest.approx(math.sin(tv * f), abs=1e-4)
    odd = timestep_sinusoid(t, dim=7)
    assert odd.shape == (5, 7) and torch.all(odd[:, -1] == 0)


# ----------------------------------------------------------------------------- init rules

def test_initialisation_rules():
    torch.manual_seed(0)
    model = DiT(input_size=16, patch_size=2, in_channels=4, hidden_size=256, depth=2, num_heads=4, num_classes=10)
    zeroed = {"final_layer.linear", "final_layer.adaLN_modulation.1"} | {f"blocks.{i}.adaLN_modulation.1" for i in range(2)}
    normal02 = {"t_embedder.mlp.0", "t_embedder.mlp.2"}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        w, b = mod.weight.detach(), mod.bias.detach()
        assert torch.all(b == 0), name
        if name in zeroed:
            assert torch.all(w == 0), name
        elif name in normal02:
            assert w.std().item() == pytest.approx(0.02, rel=0.05), name
        else:  # xavier uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out)), std a / sqrt(3)
            a = math.sqrt(6.0 / (w.shape[0] + w.shape[1]))
            assert w.abs().max().item() <= a, name
            assert w.std().item() == pytest.approx(a / math.sqrt(3), rel=0.05), name
    conv = model.x_embedder.proj.weight.detach()
    a = math.sqrt(6.0 / (conv.shape[0] + conv[0].numel()))  # as a (D, C*p*p) matrix
    assert conv.abs().max().item() <= a
    assert conv.std().item() == pytest.approx(a / math.sqrt(3), rel=0.05)
    assert torch.all(model.x_embedder.proj.bias == 0)
    assert model.y_embedder.embedding_table.weight.std().item() == pytest.approx(0.02, rel=0.05)
    # adaLN-Zero: the freshly initialised network outputs exactly zero
    out = model(torch.randn(2, 4, 16, 16), torch.tensor([1, 500]), torch.tensor([0, 9]))
    assert torch.all(out == 0)


# ----------------------------------------------------------------------------- forward paths

@pytest.mark.parametrize("input_size,learn_sigma", [(8, True), ((8, 12), True), ((4, 8), False)])
def test_model_matches_independent_reference_float64(input_size, learn_sigma):
    torch.manual_seed(0)
    model = perturbed(small_dit(input_size=input_size, learn_sigma=learn_sigma)).double().eval()
    H, W = (input_size, input_size) if isinstance(input_size, int) else input_size
    x = torch.randn(3, 3, H, W, dtype=torch.float64)
    t = torch.tensor([0, 417, 999])
    y = torch.tensor([0, 4, 5])  # 5 = the null class
    ref = reference_forward({k: v.double() for k, v in model.state_dict().items()}, x, t, y, patch=2, heads=4)
    for impl in ("sdpa", "eager"):
        model.set_attention_impl(impl)
        with torch.no_grad():
            out = model(x, t, y)
        assert out.shape == (3, 6 if learn_sigma else 3, H, W)
        # float64 throughout: only summation-order differences remain
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_sdpa_matches_eager_attention_float32():
    torch.manual_seed(0)
    model = perturbed(small_dit(hidden_size=64, depth=3)).eval()
    x, t, y = torch.randn(4, 3, 8, 8), torch.randint(0, 1000, (4,)), torch.randint(0, 6, (4,))
    with torch.no_grad():
        out_sdpa = model.set_attention_impl("sdpa")(x, t, y)
        out_eager = model.set_attention_impl("eager")(x, t, y)
    # fp32: different summation orders, ~1e-6 relative through 3 blocks
    torch.testing.assert_close(out_sdpa, out_eager, rtol=1e-5, atol=1e-5)
    assert out_sdpa.abs().mean() > 1e-2  # the comparison is not between zeros


def test_grad_checkpoint_gives_identical_gradients():
    torch.manual_seed(0)
    base = perturbed(small_dit(depth=3))
    ckpt = small_dit(depth=3).set_grad_checkpoint(True)
    ckpt.load_state_dict(base.state_dict())
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([5, 50, 500]), torch.tensor([1, 2, 3])
    grads = []
    for m in (base, ckpt):
        m.train()
        m.zero_grad()
        torch.manual_seed(123)  # same class-dropout draw
        (m(x, t, y) ** 2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        # recomputation runs the very same kernels on the same inputs: bitwise equal
        assert torch.equal(grads[0][n], grads[1][n]), n


def test_forward_with_cfg_uses_the_null_label():
    torch.manual_seed(0)
    model = perturbed(small_dit(num_classes=5)).eval()
    n = 3
    z = torch.randn(n, 3, 8, 8)
    labels = torch.tensor([0, 2, 4])
    null = torch.full((n,), 5)  # the null class is num_classes, not 0
    x = torch.cat([z, z])
    y = torch.cat([labels, null])
    t = torch.tensor([10, 500, 999] * 2)
    s = 4.0
    with torch.no_grad():
        cond = model(z, t[:n], labels)
        uncond = model(z, t[:n], null)
        out = model.forward_with_cfg(x, t, y, s)
        out3 = model.forward_with_cfg(x, t, y, s, guidance_channels=3)
        out2 = model.forward_with_cfg(x, t, y, s, guidance_channels=2)
        one = model.forward_with_cfg(x, t, y, 1.0)
    guided = uncond[:, :3] + s * (cond[:, :3] - uncond[:, :3])
    for o in (out, out3):
        torch.testing.assert_close(o[:n, :3], guided, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o[n:, :3], o[:n, :3])  # both halves carry the guided epsilon
        torch.testing.assert_close(o[:n, 3:], cond[:, 3:])  # variance half: unguided,
        torch.testing.assert_close(o[n:, 3:], uncond[:, 3:])  # each half its own model output
    torch.testing.assert_close(out2[:n, 2:], cond[:, 2:])  # channel 2 left unguided
    torch.testing.assert_close(out2[:n, :2], guided[:, :2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one[:n], cond, rtol=1e-5, atol=1e-5)
    # class dropout in training mode replaces labels with the null row
    model.train()
    model.y_embedder.dropout_prob = 1.0
    with torch.no_grad():
        dropped = model(z, t[:n], labels)
    torch.testing.assert_close(dropped, uncond)
    with pytest.raises(ValueError):
        model.forward_with_cfg(x, t, y, s, guidance_channels=7)


def test_wrong_input_size_is_a_clear_error():
    model = small_dit()
    with pytest.raises(ValueError, match="built for inputs of size"):
        model(torch.randn(1, 3, 16, 16), torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(ValueError, match="divisible"):
        small_dit(input_size=7)


def test_flash_attention_without_gpu_is_a_clear_error():
    model = small_dit().set_attention_impl("flash")
    assert model.attention_impl == "flash"
    with pytest.raises(AttentionBackendError, match="flash attention needs a CUDA GPU"):
        model(torch.randn(1, 3, 8, 8), torch.tensor([1]), torch.tensor([1]))


def test_bf16_autocast_forward_close_to_fp32():
    # low-precision path at a tiny size: bf16 has an 8-bit mantissa (rel. error ~4e-3 per op)
    torch.manual_seed(0)
    model = perturbed(small_dit()).eval()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, y)
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 3e-2


@pytest.mark.gpu
def test_flash_attention_matches_sdpa_on_gpu():
    torch.manual_seed(0)
    model = perturbed(small_dit(hidden_size=128, num_heads=2)).cuda().eval()
    x = torch.randn(4, 3, 8, 8, device="cuda")
    t = torch.randint(0, 1000, (4,), device="cuda")
    y = torch.randint(0, 5, (4,), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ref = model.set_attention_impl("eager")(x, t, y).float()
        fast = model.set_attention_impl("flash")(x, t, y).float()
    assert ((fast - ref).norm() / ref.norm()).item() < 2e-2


@pytest.mark.parametrize(
    "size,gmacs",  # the facts file's table: GMACs of one forward pass at 256 px for patch 2 / 4 / 8
    [("S", (6.06, 1.41, 0.36)), ("B", (23.01, 5.57, 1.42)), ("L", (80.70, 19.70, 5.01)), ("XL", (118.62, 29.04, 7.39))],
)
def test_forward_macs_match_the_published_table(size, gmacs):
    from opendit.flops import dit_forward_macs

    for p, expected in zip((2, 4, 8), gmacs):
        with torch.device("meta"):
            model = DiT_models[f"DiT-{size}/{p}"](input_size=32)
        assert round(dit_forward_macs(model.config) / 1e9, 2) == pytest.approx(expected, abs=0.011)
    with torch.device("meta"):
        xl512 = DiT_models["DiT-XL/2"](input_size=64)
    assert dit_forward_macs(xl512.config) / 1e9 == pytest.approx(524.5, abs=0.06)

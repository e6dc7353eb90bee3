"""The LightningDiT block options (RMSNorm, SwiGLU, 2-D RoPE, QK-norm, no shift, no absolute embedding): each against a
closed form or a naive reference, the whole model against an independent forward of the LightningDiT layout, the
published LightningDiT-XL/1 state dict layout, speed paths (grad checkpointing, compile without graph breaks), and
training / resuming / sampling through the CLIs, zero2 on 2 processes against 1, and bad combinations."""

import json
import math
import os
import sys

import pytest
import torch

from helpers import TINY, only_run_dir, perturbed, read_metrics, run, run_cut_at_first_checkpoint, run_train, REPO
from reference_lightningdit import lightningdit_xl1_shapes, reference_forward, rope_angle
from opendit.models import BLOCK_OPTIONS, DiT, DiTConfig, DiT_models, block_options_problem, config_from_state_dict
from opendit.models.dit import RMSNorm, RotaryEmbedding2D, SwiGLU, apply_rope, rope_2d_table
from opendit.checkpoint import list_checkpoints

SAMPLE_DDP = os.path.join(REPO, "scripts", "dit", "sample_ddp.py")
SAMPLE_DIT = os.path.join(REPO, "scripts", "dit", "sample_dit.py")
LIGHTNING = ["--use_rmsnorm", "--use_swiglu", "--use_rope", "--use_qknorm", "--wo_shift"]
ALL_ON = dict(use_rmsnorm=True, use_swiglu=True, use_rope=True, use_qknorm=True, wo_shift=True)


def small(**kw) -> DiT:
    args = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=5)
    args.update(kw)
    return DiT(**args)


# ----------------------------------------------------------------------------- each option against a closed form

def test_rmsnorm_closed_form():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g, dtype=torch.float64)
    norm = RMSNorm(16).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=g, dtype=torch.float64))
    want = torch.stack([torch.stack([x[i, j] / math.sqrt(float((x[i, j] ** 2).sum()) / 16 + 1e-6) * norm.weight
                                     for j in range(5)]) for i in range(3)])
    torch.testing.assert_close(norm(x), want, rtol=1e-12, atol=1e-12)
    # fp32 in, fp32 out, the statistic in fp32 (as published); bf16 input: computed in fp32, rounded once
    xb = x.float().bfloat16()
    out = RMSNorm(16)(xb)
    ref = (xb.float() * torch.rsqrt(xb.float().pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16().float()
    assert out.dtype == torch.float32 and torch.equal(out, ref)  # weight fp32 (ones): promoted, as published


def test_swiglu_closed_form_and_published_width():
    g = torch.Generator().manual_seed(1)
    ffn = SwiGLU(12, 32).double()
    for p in ffn.parameters():
        torch.nn.init.normal_(p, generator=g)
    x = torch.randn(2, 3, 12, generator=g, dtype=torch.float64)
    W, b = ffn.w12.weight, ffn.w12.bias
    a = x @ W[:32].T + b[:32]
    gate = x @ W[32:].T + b[32:]
    want = (a / (1 + torch.exp(-a)) * gate) @ ffn.w3.weight.T + ffn.w3.bias
    torch.testing.assert_close(ffn(x), want, rtol=1e-12, atol=1e-12)
    # hidden width int(2/3 * int(D * mlp_ratio)): 3072 for XL (D 1152), 341 for DiT-N's 128
    with torch.device("meta"):
        assert DiT_models["DiT-XL/2"](use_swiglu=True).blocks[0].mlp.w3.in_features == 3072
        assert DiT_models["DiT-N/2"](input_size=8, use_swiglu=True).blocks[0].mlp.w3.in_features == 341


def test_rope_rotates_every_pair_by_the_published_2d_angles():
    head_dim, grid = 16, (3, 4)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 3, 12, head_dim, generator=g, dtype=torch.float64)  # (N, heads, T, hd)
    cos, sin = rope_2d_table(head_dim, grid)
    out = apply_rope(q, (cos.double(), sin.double()))
    want = torch.empty_like(q)
    for tok in range(12):
        r, c = divmod(tok, grid[1])
        for ch in range(0, head_dim, 2):
            a = rope_angle(r, c, ch, head_dim)
            rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)
            want[:, :, tok, ch:ch + 2] = q[:, :, tok, ch:ch + 2] @ rot.T
    # the table is float32 (a buffer, as published): angles up to 3 rad, cos/sin rounded to ~1e-7
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    # the standalone module (LightningDiT's feat_rope(q)) is the same map
    torch.testing.assert_close(RotaryEmbedding2D(head_dim, grid).double()(q), out, rtol=0, atol=0)


def test_rope_table_is_eva02s_vision_rotary_layout():
    """EVA-02 / LightningDiT build the table as: freqs = 1/10000^(arange(0, d, 2)/d) for d = hd/2, outer with the
    positions, each frequency repeated for its pair, [row part | column part] -> (T, hd)."""
    hd, n = 72, 16
    d = hd // 2
    freqs = 1.0 / 10000 ** (torch.arange(0, d, 2)[: d // 2].float() / d)
    f = torch.einsum("i,f->if", torch.arange(n).float(), freqs)
    f = torch.stack([f, f], dim=-1).flatten(-2)  # "... n -> ... (n r)", r = 2
    table = torch.cat([f[:, None, :].expand(n, n, d), f[None, :, :].expand(n, n, d)], dim=-1).reshape(n * n, hd)
    cos, sin = rope_2d_table(hd, (n, n))
    torch.testing.assert_close(cos, table.cos(), rtol=0, atol=0)
    torch.testing.assert_close(sin, table.sin(), rtol=0, atol=0)


def test_rope_attention_scores_depend_only_on_position_differences():
    hd, grid = 8, (6, 6)
    cos, sin = (t.double() for t in rope_2d_table(hd, grid))
    g = torch.Generator().manual_seed(3)
    qv, kv = torch.randn(hd, generator=g, dtype=torch.float64), torch.randn(hd, generator=g, dtype=torch.float64)
    T = grid[0] * grid[1]
    q = apply_rope(qv.expand(1, 1, T, hd), (cos, sin))[0, 0]  # the same query at every position
    k = apply_rope(kv.expand(1, 1, T, hd), (cos, sin))[0, 0]
    scores = q @ k.T  # (T, T)

    def at(r, c):
        return r * grid[1] + c

    for (r1, c1, r2, c2) in [(0, 0, 2, 3), (1, 4, 0, 1), (5, 5, 3, 0)]:
        base = scores[at(r1, c1), at(r2, c2)]
        for dr, dc in [(1, 0), (0, 1)]:  # shift both tokens the same way (where the grid has room)
            if max(r1, r2) + dr < grid[0] and max(c1, c2) + dc < grid[1]:
                # float32 tables (cos/sin rounded to ~6e-8): equal to 1e-6 on scores of order 1
                torch.testing.assert_close(scores[at(r1 + dr, c1 + dc), at(r2 + dr, c2 + dc)], base,
                                           rtol=0, atol=1e-6)
    assert abs(scores[at(0, 0), at(0, 1)] - scores[at(0, 0), at(1, 0)]) > 1e-2  # rows and columns differ


@pytest.mark.parametrize("rmsnorm", [False, True])
def test_qknorm_normalizes_each_head_of_q_and_k(rmsnorm):
    torch.manual_seed(0)
    m = perturbed(small(use_qknorm=True, use_rmsnorm=rmsnorm).double(), seed=4)
    attn = m.blocks[0].attn
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    qkv = attn.qkv(x).reshape(2, 16, 3, 2, 16).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)

    def norm(t, mod):
        if rmsnorm:
            return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * mod.weight
        mu, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-5) * mod.weight + mod.bias

    qn, kn = norm(q, attn.q_norm), norm(k, attn.k_norm)
    want = attn.proj((torch.softmax(qn @ kn.transpose(-1, -2) / 4.0, -1) @ v).transpose(1, 2).reshape(2, 16, 32))
    torch.testing.assert_close(attn(x), want, rtol=1e-10, atol=1e-12)
    assert sorted(n for n, _ in attn.named_parameters() if "norm" in n) == (
        ["k_norm.weight", "q_norm.weight"] if rmsnorm else ["k_norm.bias", "k_norm.weight", "q_norm.bias", "q_norm.weight"])


# ----------------------------------------------------------------------------- the whole model

def test_all_options_off_is_the_published_dit():
    """Explicit False options build the default model: the published keys in the same order, the same initial weights
    from the same seed (no extra random draws), the naive DiT reference's outputs (tests/reference_dit.py, float64).
    The default path's bit-for-bit check is `make demo` (its checkpoints and samples, byte-compared before and after)."""
    from reference_dit import reference_forward as dit_reference

    torch.manual_seed(0)
    a = DiT_models["DiT-N/2"](input_size=8, in_channels=1, num_classes=10)
    torch.manual_seed(0)
    b = DiT_models["DiT-N/2"](input_size=8, in_channels=1, num_classes=10, **{k: False for k in BLOCK_OPTIONS})
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert b.feat_rope is None and not any(k.startswith("feat_rope") for k in sb)
    b = perturbed(b.double(), 5).eval()
    x, t, y = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.tensor([1, 10, 100, 999]), torch.tensor([0, 3, 7, 9])
    want = dit_reference(b.state_dict(), x, t, y, patch=2, heads=4)
    torch.testing.assert_close(b(x, t, y), want, rtol=1e-10, atol=1e-12)


OPTION_SETS = [
    dict(use_rmsnorm=True),
    dict(use_swiglu=True),
    dict(use_rope=True),
    dict(use_qknorm=True),
    dict(wo_shift=True),
    dict(use_rope=True, wo_pos_embed=True),
    dict(use_rmsnorm=True, use_swiglu=True, use_rope=True),  # LightningDiT-XL/1's published set
    dict(ALL_ON, wo_pos_embed=True),
]


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: "+".join(sorted(o)))
def test_model_with_options_equals_the_naive_lightningdit_forward(options):
    torch.manual_seed(0)
    m = perturbed(DiT(input_size=(4, 6), patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                      num_classes=5, learn_sigma=False, **options).double(), seed=6).eval()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 4, 6, generator=g, dtype=torch.float64)  # a non-square 2 x 3 token grid
    t, y = torch.tensor([3.0, 700.0], dtype=torch.float64), torch.tensor([1, 4])
    sd = {k: v.double() for k, v in m.state_dict().items()}
    want = reference_forward(sd, x, t, y, patch=2, heads=2, **options)
    # the RoPE tables are float32 buffers (as published): cos/sin good to ~1e-7; the rest is float64
    torch.testing.assert_close(m(x, t, y), want, rtol=1e-6, atol=1e-7)


def test_lightningdit_xl1_state_dict_layout_loads_strict():
    with torch.device("meta"):
        ours = DiT_models["LightningDiT-XL/1"](input_size=16, in_channels=32, learn_sigma=False, use_rmsnorm=True,
                                               use_swiglu=True, use_rope=True)
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == lightningdit_xl1_shapes()
    assert round(sum(p.numel() for p in ours.parameters()) / 1e6, 1) == 675.3  # the 675M of LightningDiT-XL
    with torch.device("meta"):
        qk = DiT_models["LightningDiT-XL/1"](input_size=16, in_channels=32, learn_sigma=False, use_rmsnorm=True,
                                             use_swiglu=True, use_rope=True, use_qknorm=True, wo_shift=True)
    assert {k: tuple(v.shape) for k, v in qk.state_dict().items()} == lightningdit_xl1_shapes(use_qknorm=True,
                                                                                            wo_shift=True)


def test_a_lightningdit_layout_state_dict_loads_strict_and_its_options_are_read_from_it(tmp_path):
    """A state dict with LightningDiT's keys (written from the facts, random values) loads strict into the model
    that config_from_state_dict describes, and the sampling loader builds that model from the file alone."""

    D, heads, F_, T, hd = 32, 2, int(2 / 3 * 128), 16, 16
    shapes = {"pos_embed": (1, T, D), "x_embedder.proj.weight": (D, 8, 1, 1), "x_embedder.proj.bias": (D,),
              "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,), "t_embedder.mlp.2.weight": (D, D),
              "t_embedder.mlp.2.bias": (D,), "y_embedder.embedding_table.weight": (11, D),
              "feat_rope.freqs_cos": (T, hd), "feat_rope.freqs_sin": (T, hd), "final_layer.norm_final.weight": (D,),
              "final_layer.linear.weight": (8, D), "final_layer.linear.bias": (8,),
              "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,)}
    for n in range(3):
        b = f"blocks.{n}."
        shapes.update({b + "norm1.weight": (D,), b + "norm2.weight": (D,), b + "attn.qkv.weight": (3 * D, D),
                       b + "attn.qkv.bias": (3 * D,), b + "attn.q_norm.weight": (hd,), b + "attn.k_norm.weight": (hd,),
                       b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,), b + "mlp.w12.weight": (2 * F_, D),
                       b + "mlp.w12.bias": (2 * F_,), b + "mlp.w3.weight": (D, F_), b + "mlp.w3.bias": (D,),
                       b + "adaLN_modulation.1.weight": (4 * D, D), b + "adaLN_modulation.1.bias": (4 * D,)})
    g = torch.Generator().manual_seed(8)
    sd = {k: 0.2 * torch.randn(s, generator=g) for k, s in shapes.items()}
    cos, sin = rope_2d_table(hd, (4, 4))
    sd["feat_rope.freqs_cos"], sd["feat_rope.freqs_sin"] = cos, sin
    cfg = config_from_state_dict(sd)
    assert cfg["options"] == dict(ALL_ON, wo_pos_embed=False) and cfg["mlp_ratio"] == 4.0
    m = DiT(input_size=4, patch_size=1, in_channels=8, hidden_size=D, depth=3, num_heads=heads, num_classes=10,
            learn_sigma=False, **cfg["options"]).eval()
    assert DiTConfig.from_state_dict(sd, num_heads=heads) == m.config  # the config the weights describe
    m.load_state_dict(sd, strict=True)
    x, t, y = torch.randn(2, 8, 4, 4, generator=g), torch.tensor([0.2, 0.9]), torch.tensor([1, 2])
    want = reference_forward({k: v.double() for k, v in sd.items()}, x.double(), t, y, patch=1, heads=heads, **ALL_ON)
    torch.testing.assert_close(m(x, t, y).double(), want, rtol=1e-5, atol=1e-5)  # fp32 model vs float64 reference


def test_grad_checkpoint_and_compiled_blocks_with_all_options():
    """Grad checkpointing: the identical step. Compile: each block as one graph (fullgraph: a graph break is an
    error), AOTAutograd-traced as parallelize.apply_compile does (no C++ toolchain needed), fp32 ulps apart."""
    torch.manual_seed(0)
    base = perturbed(small(**ALL_ON), seed=9).eval()  # eval: no random class dropout between the runs
    g = torch.Generator().manual_seed(10)
    x, t, y = torch.randn(3, 3, 8, 8, generator=g), torch.tensor([5, 50, 500]), torch.tensor([0, 1, 4])

    def grads(model):
        model.zero_grad()
        out = model(x, t, y)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out0, g0 = grads(base)
    ckpt = small(**ALL_ON).eval()
    ckpt.load_state_dict(base.state_dict())
    out1, g1 = grads(ckpt.set_grad_checkpoint(True))
    assert torch.equal(out0, out1) and all(torch.equal(g0[n], g1[n]) for n in g0)
    comp = small(**ALL_ON).eval()
    comp.load_state_dict(base.state_dict())
    torch._dynamo.reset()
    for block in comp.blocks:
        block.compile(backend="aot_eager", fullgraph=True)
    out2, g2 = grads(comp)
    torch.testing.assert_close(out2, out0, rtol=1e-5, atol=1e-6)
    assert all(torch.allclose(g2[n], g0[n], rtol=1e-4, atol=1e-6) for n in g0)


def test_forward_macs_count_swiglu_and_no_shift():
    from opendit.flops import dit_forward_macs

    with torch.device("meta"):
        plain = DiT_models["DiT-XL/2"](input_size=32)
        light = DiT_models["DiT-XL/2"](input_size=32, use_swiglu=True, wo_shift=True, use_rope=True)
    D, T = 1152, 256
    delta = 28 * (T * (3 * D * 3072 - 2 * D * 4608) + (4 - 6) * D * D)  # SwiGLU's three products; two fewer D x D
    assert dit_forward_macs(light.config) - dit_forward_macs(plain.config) == delta


# ----------------------------------------------------------------------------- bad combinations

def test_bad_combinations_are_refused_in_the_model_in_its_own_terms():
    assert "divisible by 4" in block_options_problem({"use_rope": True}, 36, 6)  # head dim 6
    assert "--" not in block_options_problem({"wo_pos_embed": True}, 32, 2)  # the model names options, not flags
    with pytest.raises(ValueError, match="divisible by 4"):
        DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=36, depth=1, num_heads=6, use_rope=True)
    with pytest.raises(ValueError, match="wo_pos_embed"):
        small(wo_pos_embed=True)
    with pytest.raises(ValueError, match="use_rmsnorm model compiles instead"):
        small(use_rmsnorm=True).set_norm_impl("modulate_kernel")
    assert block_options_problem({"use_rope": True, "wo_pos_embed": True}, 32, 2) is None


@pytest.mark.parametrize("case", ["pos_without_rope", "rmsnorm_kernel", "multiplier_without_norm", "norm_in_pixels"])
def test_bad_option_input_is_one_line_and_exit_2(case, tmp_path):
    argv = {"pos_without_rope": ["--wo_pos_embed"], "rmsnorm_kernel": ["--use_rmsnorm", "--enable_modulate_kernel"],
            "multiplier_without_norm": ["--latent_multiplier", "2"], "norm_in_pixels": ["--latent_norm"]}[case]
    r = run_train(*TINY, *argv, "--max_steps", "1", "--batch_size", "8", "--outputs", str(tmp_path / "out"))
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert not os.path.exists(tmp_path / "out") or not os.listdir(tmp_path / "out")
    want = {"pos_without_rope": "without --use_rope", "rmsnorm_kernel": "use --compile instead",
            "multiplier_without_norm": "add --latent_norm", "norm_in_pixels": "needs --dataset latents"}[case]
    assert want in lines[0]


# ----------------------------------------------------------------------------- through the CLIs

@pytest.fixture(scope="module")
def options_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("blocks")
    r = run_train(*TINY, *LIGHTNING, "--wo_pos_embed", "--objective", "flow", "--time_sampling", "logit_normal",
                  "--batch_size", "32", "--max_steps", "4", "--log_every", "1", "--ckpt_every", "2",
                  "--ckpt_keep", "0", "--outputs", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return only_run_dir(out)


def test_options_are_recorded_and_the_checkpoint_has_the_lightningdit_layout(options_run):
    cfg = json.load(open(os.path.join(options_run, "config.json")))
    assert {k: cfg[k] for k in BLOCK_OPTIONS} == dict(ALL_ON, wo_pos_embed=True)
    ema = torch.load(os.path.join(list_checkpoints(options_run)[-1], "ema.pt"), weights_only=True)
    assert "feat_rope.freqs_cos" in ema and "blocks.3.mlp.w12.weight" in ema and "blocks.0.attn.q_norm.weight" in ema
    m = DiT_models["DiT-N/2"](input_size=8, in_channels=1, num_classes=10, **ALL_ON, wo_pos_embed=True)
    m.load_state_dict(ema, strict=True)


def test_zero2_with_options_equals_one_process(options_run, tmp_path):
    r = run_train(*TINY, *LIGHTNING, "--wo_pos_embed", "--objective", "flow", "--time_sampling", "logit_normal",
                  "--batch_size", "16", "--max_steps", "4", "--log_every", "1", "--plugin", "zero2",
                  "--outputs", str(tmp_path), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = read_metrics(options_run), read_metrics(only_run_dir(tmp_path))
    assert sorted(two) == [1, 2, 3, 4]
    for s in one:  # fp32, the same global batch and noise: only the reduction order differs
        assert two[s]["loss"] == pytest.approx(one[s]["loss"], rel=1e-5), s
        assert two[s]["grad_norm"] == pytest.approx(one[s]["grad_norm"], rel=1e-4), s


def test_options_resume_bit_for_bit_and_are_defining(options_run, tmp_path):
    part = run_cut_at_first_checkpoint(options_run, tmp_path)
    r = run_train("--load", part, "--log_every", "1", "--device", "cpu")  # the options come with the run
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = read_metrics(options_run), read_metrics(part)
    assert sorted(b) == [3, 4] and all(b[s]["loss"] == a[s]["loss"] for s in (3, 4))
    from opendit.errors import UserError
    from opendit.cli.flags import parse_argv
    from opendit.config import TrainConfig
    from opendit.training.run_settings import apply_run_settings

    saved = json.load(open(os.path.join(options_run, "config.json")))
    cfg = parse_argv(TrainConfig, [*TINY, *LIGHTNING, "--wo_pos_embed"])
    apply_run_settings(cfg, {"use_rope", "use_swiglu"}, saved, 1, options_run)  # the run's values: accepted
    for key in BLOCK_OPTIONS:  # a run without an option cannot be resumed with it (and the other way)
        flipped = dict(saved, **{key: not saved[key]})
        with pytest.raises(UserError, match=f"--{key} True: the run in .* was started with --{key} False"):
            apply_run_settings(parse_argv(TrainConfig, [*TINY, *LIGHTNING, "--wo_pos_embed"]), {key}, flipped, 1,
                               options_run)


def test_options_sample_through_every_entry_point(options_run, tmp_path):
    ckpt = list_checkpoints(options_run)[-1]
    r = run([sys.executable, SAMPLE_DDP, "--ckpt", options_run, "--num_samples", "20", "--per_proc_batch_size", "20",
             "--num_sampling_steps", "5", "--device", "cpu", "--sample_dir", str(tmp_path / "s")])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run([sys.executable, SAMPLE_DIT, "--ckpt", ckpt, "--num_sampling_steps", "5", "--device", "cpu",
             "--labels", "1,2", "--out", str(tmp_path / "grid.png")])
    assert r.returncode == 0 and os.path.isfile(tmp_path / "grid.png"), r.stderr[-3000:]
    # the sampler's model is the trained one: same EMA outputs as a model built by hand from the options
    from opendit.cli.flags import parse_argv
    from opendit.config import GridConfig
    from opendit.parallelize import ModelOptions
    from opendit.sampling.load import load_for_sampling

    cfg = parse_argv(GridConfig, ["--ckpt", ckpt, "--device", "cpu"])
    loaded = load_for_sampling(cfg.checkpoint, ModelOptions(), torch.device("cpu"))
    assert loaded.model.options == dict(ALL_ON, wo_pos_embed=True)  # wo_pos_embed: from the run's config.json
    # a bare ema.pt cannot say wo_pos_embed; diffusers cannot hold the options: one line
    r = run([sys.executable, "-m", "opendit", "convert", ckpt, str(tmp_path / "d")])
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "DiTTransformer2DModel has no" in lines[0], r.stderr[-2000:]
    r = run([sys.executable, "-m", "opendit", "convert", ckpt, str(tmp_path / "m.safetensors")])
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_rope_checkpoint_at_another_grid_is_one_line(options_run):
    r = run([sys.executable, SAMPLE_DIT, "--ckpt", options_run, "--image_size", "16", "--num_sampling_steps", "5",
             "--device", "cpu"])
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "--image_size 8, not 16" in lines[0], r.stderr[-2000:]

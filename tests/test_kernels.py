"""Triton kernels against their torch references (interpreter mode on CPU: TRITON_INTERPRET=1, set in conftest).

Tolerances, as relative Frobenius errors: fp32 1e-5 (both sides compute in fp32; only summation order differs, ~1e-7
measured); bf16 1e-2 (outputs are rounded to bf16, 2^-8 relative per element; measured ~4e-3); fp16 2e-3 (2^-11)."""

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (Linux x86_64 dev extra)")

from opendit.kernels import gated_residual, gated_residual_reference, layer_norm, norm_modulate, norm_modulate_reference  # noqa: E402
from opendit.models import DiT  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check(B, T, D, dtype, contiguous=True, magnitude=1.0, modulate=True):
    g = torch.Generator().manual_seed(B * 1000 + T * 10 + D)
    x = (torch.randn(B, T, D, generator=g) * magnitude).to(DEVICE, dtype)
    if not contiguous:  # a strided view: every other token of a longer sequence
        x = (torch.randn(B, 2 * T, D, generator=g) * magnitude).to(DEVICE, dtype)[:, ::2]
    x.requires_grad_(True)
    ada = torch.randn(B, 6 * D, generator=g).to(DEVICE, dtype)  # shift/scale are chunks of the adaLN output: strided views
    shift = ada[:, :D].detach().requires_grad_(True) if modulate else None
    scale = ada[:, D:2 * D].detach().requires_grad_(True) if modulate else None
    dy = torch.randn(B, T, D, generator=g).to(DEVICE, dtype)
    inputs = [t for t in (x, shift, scale) if t is not None]
    y = norm_modulate(x, shift, scale) if modulate else layer_norm(x)
    grads = torch.autograd.grad(y, inputs, dy)
    y_ref = norm_modulate_reference(x, shift, scale)
    grads_ref = torch.autograd.grad(y_ref, inputs, dy)
    assert y.dtype == dtype and y.shape == (B, T, D)
    assert torch.isfinite(y).all() and all(torch.isfinite(gr).all() for gr in grads)
    assert rel(y, y_ref) < TOL[dtype], ("y", rel(y, y_ref))
    for name, a, b in zip(("dx", "dshift", "dscale"), grads, grads_ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert rel(a, b) < TOL[dtype] * (4 if name == "dscale" else 1), (name, rel(a, b))


@pytest.mark.parametrize("B", [1, 2, 3, 5])
@pytest.mark.parametrize("T", [1, 7, 15])
@pytest.mark.parametrize("D,dtype", [(384, torch.float32), (1152, torch.float32), (384, torch.bfloat16), (1152, torch.bfloat16)])
def test_norm_modulate_matches_reference(B, T, D, dtype):
    check(B, T, D, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("B,D,dtype", [(1, 1152, torch.float32), (2, 384, torch.bfloat16), (3, 384, torch.float32), (5, 384, torch.float32)])
def test_norm_modulate_256_tokens(B, D, dtype):
    check(B, 256, D, dtype)


@pytest.mark.parametrize("B,T,D", [(1, 1, 384), (2, 7, 1152), (5, 15, 384)])
def test_norm_modulate_fp16(B, T, D):
    check(B, T, D, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layernorm_kernel_and_strided_inputs(dtype):
    check(3, 7, 384, dtype, modulate=False)
    check(2, 15, 384, dtype, contiguous=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_nan_on_large_magnitudes(dtype):
    # values of 1e4 (bf16) and 1e15 (fp32): squares overflow neither, since statistics are fp32 on centred values
    check(2, 7, 384, dtype, magnitude=1e4 if dtype == torch.bfloat16 else 1e15)


@pytest.mark.parametrize("B,T,D", [(1, 1, 384), (2, 7, 1152), (3, 15, 384),
                                   pytest.param(5, 256, 384, marks=pytest.mark.slow)])  # interpreter: ~12 s each
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_residual_matches_reference(B, T, D, dtype):
    g = torch.Generator().manual_seed(B + T + D)
    x = torch.randn(B, T, D, generator=g).to(DEVICE).requires_grad_(True)  # the fp32 residual stream
    gate = torch.randn(B, 6 * D, generator=g).to(DEVICE, dtype)[:, 2 * D:3 * D].detach().requires_grad_(True)
    y = torch.randn(B, T, D, generator=g).to(DEVICE, dtype).requires_grad_(True)
    dz = torch.randn(B, T, D, generator=g).to(DEVICE)
    z = gated_residual(x, gate, y)
    grads = torch.autograd.grad(z, (x, gate, y), dz)
    z_ref = gated_residual_reference(x, gate, y)
    grads_ref = torch.autograd.grad(z_ref, (x, gate, y), dz)
    # the kernel multiplies in fp32; the reference rounds gate * y to bf16 first: the bf16 tolerance covers that
    assert z.dtype == z_ref.dtype and rel(z, z_ref) < TOL[dtype]
    for a, b in zip(grads, grads_ref):
        assert a.dtype == b.dtype and rel(a, b) < TOL[dtype]


def test_full_dit_with_kernels_matches_without():
    from helpers import perturbed

    torch.manual_seed(0)
    ref = perturbed(DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=64, depth=2, num_heads=4, num_classes=5))
    ref = ref.to(DEVICE)
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 4, 5])
    x, t, y = x.to(DEVICE), t.to(DEVICE), y.to(DEVICE)
    results = {}
    for impl in ("torch", "layernorm_kernel", "modulate_kernel"):
        ref.set_norm_impl(impl).zero_grad()
        out = ref(x, t, y, force_drop_ids=torch.tensor([0, 0, 1], device=DEVICE))
        loss = (out ** 2).mean()
        loss.backward()
        results[impl] = (loss.detach(), {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None})
    base_loss, base_grads = results["torch"]
    for impl in ("layernorm_kernel", "modulate_kernel"):
        loss, grads = results[impl]
        torch.testing.assert_close(loss, base_loss, rtol=1e-5, atol=1e-7)
        assert grads.keys() == base_grads.keys()
        for n in grads:
            torch.testing.assert_close(grads[n], base_grads[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{impl} {n}: {m}")
    kw = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=64, depth=1, num_heads=4, num_classes=5)
    assert DiT(**kw).set_norm_impl("modulate_kernel").blocks[0].norm_impl == "modulate_kernel"
    assert DiT(**kw).set_norm_impl("layernorm_kernel").final_layer.norm_impl == "layernorm_kernel"


@pytest.mark.slow  # the whole trainer through the Triton interpreter: ~70 s on 2 cores
def test_trainer_kernel_flags(tmp_path):
    from helpers import TINY, only_run_dir, read_metrics, run_train

    # 2 steps of batch 8: the Triton interpreter runs every program instance in Python (~70 s on 2 cores)
    common = [*TINY, "--batch_size", "8", "--max_steps", "2", "--log_every", "1"]
    base = run_train(*common, "--outputs", str(tmp_path / "base"))
    fused = run_train(*common, "--enable_modulate_kernel", "--outputs", str(tmp_path / "fused"))
    assert base.returncode == 0 and fused.returncode == 0, fused.stderr[-2000:]
    a, b = read_metrics(only_run_dir(tmp_path / "base")), read_metrics(only_run_dir(tmp_path / "fused"))
    for s in a:
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-5)
    # without a GPU (and outside the interpreter) the flag is a one-line error
    r = run_train(*common, "--enable_layernorm_kernel", "--outputs", str(tmp_path / "no"), env_extra={"TRITON_INTERPRET": "0"})
    assert r.returncode == 2 and r.stderr.strip().startswith("error: --enable_layernorm_kernel")
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "no").exists()


def test_compiled_block_has_no_graph_break():
    import torch._dynamo

    from opendit.models.dit import DiTBlock

    block = DiTBlock(64, 4)
    x, c = torch.randn(2, 16, 64), torch.randn(2, 64)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(block)(x, c)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons

"""REPA: the alignment loss against a naive per-token loop, where its gradients go, the encoders (DINOv2 against a naive
forward of the released layout, the digits encoder, factories), and training through the CLI: zero2 on 2 processes
against 1 process, resume, the checkpoint layout, and one-line errors. Precomputed features: tests/test_latents.py."""

import json
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY, only_run_dir, read_metrics, run, run_cut_at_first_checkpoint, run_train, REPO
from reference_repa import naive_dinov2, repa_targets
from opendit.alignment import PREFIX, RepaLoss, alignment_loss, attach_projectors, build_encoders, encode, match_grid
from opendit.alignment import dinov2
from opendit.errors import UserError
from opendit.models import DiT, DiT_models
from opendit.checkpoint import list_checkpoints
from opendit.training.step import StepBatch

REPA = ["--repa_encoder", "digits", "--repa_depth", "2", "--repa_projector_dim", "64"]
SAMPLE_DDP = os.path.join(REPO, "scripts", "dit", "sample_ddp.py")
SAMPLE_DIT = os.path.join(REPO, "scripts", "dit", "sample_dit.py")


def test_alignment_loss_equals_a_naive_per_token_computation():
    g = torch.Generator().manual_seed(0)
    n, t = 3, 5
    projected = [torch.randn(n, t, 7, generator=g), torch.randn(n, t, 4, generator=g)]
    targets = [torch.randn(n, t, 7, generator=g), torch.randn(n, t, 4, generator=g)]
    naive = 0.0
    for p, z in zip(projected, targets):
        per_encoder = 0.0
        for i in range(n):
            for j in range(t):
                a, b = p[i, j].double(), z[i, j].double()
                per_encoder += -(a @ b) / (a.norm() * b.norm())
        naive += per_encoder / (n * t)
    naive /= len(projected)
    assert alignment_loss(projected, targets).item() == pytest.approx(naive.item(), rel=1e-6)
    # aligned features: -1; a bf16 projection is compared in fp32
    assert alignment_loss([targets[0] * 3], [targets[0]]).item() == pytest.approx(-1.0, abs=1e-6)
    assert alignment_loss([targets[0].bfloat16()], [targets[0]]).dtype == torch.float32


def test_features_are_resized_to_the_token_grid():
    z = torch.randn(2, 16, 3)
    assert match_grid(z, (4, 4)) is z
    # a field linear in the column index: bilinear upsampling (align_corners=False) keeps it linear inside the grid
    col = torch.arange(4.0).repeat(4)  # (16,) row-major: value = column
    up = match_grid(col.view(1, 16, 1), (8, 8)).view(8, 8)
    # output column x samples input column x / 2 - 0.25 (clamped at the borders): value (x - 0.5) / 2 inside
    torch.testing.assert_close(up[:, 1:7], ((torch.arange(8.0)[1:7] - 0.5) / 2).expand(8, 6))
    down = match_grid(torch.arange(64.0).view(1, 64, 1), (4, 4)).view(4, 4)  # 2x2 averages of an 8x8 ramp
    want = torch.arange(64.0).view(8, 8).unfold(0, 2, 2).unfold(1, 2, 2).mean((-1, -2))
    torch.testing.assert_close(down, want)


def tiny_dit(depth=4):
    torch.manual_seed(0)
    m = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=depth, num_heads=2, num_classes=10)
    g = torch.Generator().manual_seed(1)  # adaLN-Zero starts at the identity: give every weight a value
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def test_projector_gradients_reach_the_first_depth_blocks_only():
    model = tiny_dit()
    projectors = attach_projectors(model, [6, 5], width=16, seed=0)
    loss = RepaLoss(projectors, depth=2, weight=0.5, grid=(4, 4))
    g = torch.Generator().manual_seed(2)
    x, y, t = torch.randn(3, 1, 8, 8, generator=g), torch.tensor([1, 2, 3]), torch.tensor([5, 500, 999])
    batch = StepBatch(x, y, t, None, x, features=[torch.randn(3, 16, 6, generator=g), torch.randn(3, 4, 5, generator=g)])
    _, hidden = model(x, t, y, return_hidden=(2,))
    loss(hidden, batch).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    reached = [n for n in grads if grads[n] is not None and grads[n].abs().sum() > 0]
    assert all(n in reached for n in grads if n.startswith(("blocks.0.", "blocks.1.", "projectors.")))
    assert not [n for n in reached if n.startswith(("blocks.2.", "blocks.3.", "final_layer."))]
    # the 2x2 grid of the second encoder was resized to the 4x4 token grid
    assert projectors[1][-1].weight.grad.abs().sum() > 0


def test_projectors_have_the_published_shape_apart_from_the_dit_layout():
    model = DiT_models["DiT-XL/2"](input_size=32)
    attach_projectors(model, [768], width=2048, seed=0)
    sd = model.state_dict()
    dit = {k: v for k, v in sd.items() if not k.startswith(PREFIX)}
    proj = {k: v for k, v in sd.items() if k.startswith(PREFIX)}
    assert {k: tuple(v.shape) for k, v in proj.items()} == {
        "projectors.0.0.weight": (2048, 1152), "projectors.0.0.bias": (2048,), "projectors.0.2.weight": (2048, 2048),
        "projectors.0.2.bias": (2048,), "projectors.0.4.weight": (768, 2048), "projectors.0.4.bias": (768,)}
    DiT_models["DiT-XL/2"](input_size=32).load_state_dict(dit, strict=True)


def small_dinov2(monkeypatch, tmp_path, size, registers, heads=2, width=32, seed=0):
    """(state dict, weights file, encoder name) of a 2-block DINOv2 of the released layout (37 x 37 position table),
    random weights."""
    ffn = "swiglu" if size == "g" else "mlp"
    monkeypatch.setitem(dinov2.SIZES, size, (width, 2, heads, ffn, dinov2.SIZES[size][4]))  # a small copy
    net = dinov2.DINOv2(size, registers)
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in net.state_dict().items()}
    file = tmp_path / dinov2.weights_file_name(size, registers)
    torch.save(sd, file)
    return sd, file, f"dinov2-vit-{size}" + ("-reg" if registers else "")


@pytest.mark.parametrize("size,registers", [("s", 0), ("b", 0), ("b", 4), ("g", 4)])
def test_dinov2_network_equals_the_release_forward(tmp_path, monkeypatch, size, registers):
    """Our DINOv2 with the released 37 x 37 table, at 224 px (16 x 16 patches, the table interpolated at run time with
    the variant's settings) and at 518 px (the table as is), against DinoVisionTransformer.forward_features written out
    (tests/reference_repa.py)."""
    sd, file, _ = small_dinov2(monkeypatch, tmp_path, size, registers)
    expected_keys = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "norm.weight",
                     "blocks.1.ls2.gamma", "blocks.0.attn.qkv.weight", "blocks.0.norm1.bias"}
    expected_keys |= {"blocks.0.mlp.w12.weight", "blocks.0.mlp.w3.bias"} if size == "g" else \
        {"blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias"}
    expected_keys |= {"register_tokens"} if registers else set()
    assert expected_keys <= set(sd) and sd["pos_embed"].shape == (1, 1 + 37 * 37, 32)
    net = dinov2.load_dinov2(size, registers, str(file))
    g = torch.Generator().manual_seed(1)
    for px in (224, 518):
        x = torch.randn(2, 3, px, px, generator=g)
        with torch.no_grad():
            got = net(x)
        torch.testing.assert_close(got, naive_dinov2(sd, x, 2, registers), rtol=1e-4, atol=1e-4)  # fp32 orders
    # the other variant's interpolation settings give other features at 224 px (the bug this test guards against)
    net.interpolate_antialias, net.interpolate_offset = (False, 0.1) if registers else (True, 0.0)
    x = torch.randn(2, 3, 224, 224, generator=g)
    with torch.no_grad():
        assert (net(x) - naive_dinov2(sd, x, 2, registers)).abs().max() > 1e-2


@pytest.mark.parametrize("size,registers", [("s", 0), ("b", 0), ("b", 4)])
def test_repa_targets_equal_repa_s_own_pipeline(tmp_path, monkeypatch, size, registers):
    """The --repa_encoder features of 256 px images equal what REPA's training aligns to: the table resampled once by
    timm (antialiased bicubic) to 16 x 16, the image normalized and resized to 224 px (tests/reference_repa.py
    repa_targets, written from REPA's utils.py and train.py); the encoder built for the image size (extraction, and the
    trainer) or fixing its table at the first batch give the same."""
    sd, file, name = small_dinov2(monkeypatch, tmp_path, size, registers)
    g = torch.Generator().manual_seed(2)
    raw = torch.randint(0, 256, (2, 3, 256, 256), generator=g).float()  # uint8 pixel values
    images = raw / 127.5 - 1  # the data sets' [-1, 1]
    want = repa_targets(sd, raw, 2, registers)
    for image_size in (256, None):
        enc = build_encoders(name, str(file), "cpu", image_size)[0]
        got = encode([enc], images)[0]
        assert got.shape == (2, 256, 32)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the port before this fix: the 37 x 37 table interpolated at run time with the plain variant's settings (for the
    # _reg variant REPA's resampling equals its own run-time interpolation; the plain settings do not)
    net = dinov2.load_dinov2(size, registers, str(file))
    net.interpolate_antialias, net.interpolate_offset = False, 0.1
    x = torch.nn.functional.interpolate((raw / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
                                        / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), 224, mode="bicubic")
    with torch.no_grad():
        assert (net(x) - want).norm() / want.norm() > 1e-3
    # the hub cache is the default place; absent and offline: one line naming the file and where to put it
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.setenv("OPENDIT_OFFLINE", "1")
    with pytest.raises(UserError, match=r"download https://dl.fbaipublicfiles.com/dinov2/.*_pretrain.pth and put it at "):
        build_encoders(name, None, "cpu")
    os.makedirs(tmp_path / "hub" / "hub" / "checkpoints")
    shutil.copy(file, tmp_path / "hub" / "hub" / "checkpoints" / file.name)
    torch.testing.assert_close(encode(build_encoders(name, None, "cpu", 256), images)[0], want, rtol=1e-4, atol=1e-4)


def test_the_digits_encoder_is_the_classifiers_feature_map():
    from opendit.eval.digits import load_classifier, real_digits

    images, _ = real_digits()
    x = torch.from_numpy(images[:5]).float()[:, None]  # 0..16
    z = encode(build_encoders("digits", None, "cpu"), x / 8.0 - 1.0)[0]
    clf = load_classifier()
    with torch.no_grad():
        fmap = torch.relu(clf.conv2(torch.relu(clf.conv1(x / 16.0))))
        want = torch.nn.functional.max_pool2d(fmap, 2).flatten(2).transpose(1, 2)
    assert z.shape == (5, 16, 64)
    torch.testing.assert_close(z, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- through the training CLI

@pytest.fixture(scope="module")
def repa_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("repa")
    r = run_train(*TINY, *REPA, "--batch_size", "32", "--max_steps", "4", "--log_every", "1", "--ckpt_every", "2",
                  "--ckpt_keep", "0", "--objective", "flow", "--outputs", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return only_run_dir(out)


@pytest.mark.parametrize("plugin,extra", [("zero2", []), ("fsdp", ["--grad_checkpoint"]), ("ddp", [])])
def test_two_process_repa_equals_one_process(repa_run, tmp_path, plugin, extra):
    r = run_train(*TINY, *REPA, "--batch_size", "16", "--max_steps", "4", "--log_every", "1", "--plugin", plugin,
                  *extra, "--objective", "flow", "--outputs", str(tmp_path), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = read_metrics(repa_run), read_metrics(only_run_dir(tmp_path))
    assert sorted(two) == [1, 2, 3, 4]
    for s in one:  # fp32, the same global batch, noise and features: only the reduction order differs
        assert two[s]["loss"] == pytest.approx(one[s]["loss"], rel=1e-5), s
        assert two[s]["repa_loss"] == pytest.approx(one[s]["repa_loss"], rel=1e-5), s
    assert one[4]["repa_loss"] < one[1]["repa_loss"]  # it trains: the tokens align
    proj = load_file(os.path.join(list_checkpoints(only_run_dir(tmp_path))[-1], "projector", "projector.safetensors"))
    assert proj["projectors.0.4.weight"].shape == (64, 64)  # gathered whole from the shards


def test_repa_resume_continues_with_the_uninterrupted_losses(repa_run, tmp_path):
    part = run_cut_at_first_checkpoint(repa_run, tmp_path)
    r = run_train("--load", part, "--log_every", "1", "--device", "cpu")  # REPA's settings come with the run
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = read_metrics(repa_run), read_metrics(part)
    assert sorted(b) == [3, 4]
    for s in (3, 4):
        assert (b[s]["loss"], b[s]["repa_loss"]) == (a[s]["loss"], a[s]["repa_loss"])
    other = run_train("--load", str(part), "--repa_depth", "3", "--max_steps", "6", "--device", "cpu")
    assert other.returncode == 2 and "--repa_depth 3: the run" in other.stderr


def test_repa_checkpoints_keep_the_dit_layout_and_sample(repa_run, tmp_path):
    ckpt = list_checkpoints(repa_run)[-1]
    cfg = json.load(open(os.path.join(repa_run, "config.json")))
    assert (cfg["repa_encoder"], cfg["repa_depth"], cfg["repa_lambda"]) == ("digits", 2, 0.5)
    ema = torch.load(os.path.join(ckpt, "ema.pt"), weights_only=True)
    model = load_file(os.path.join(ckpt, "model", "model.safetensors"))
    proj = load_file(os.path.join(ckpt, "projector", "projector.safetensors"))
    plain = DiT_models["DiT-N/2"](input_size=8, in_channels=1, num_classes=10)
    plain.load_state_dict(ema, strict=True)
    plain.load_state_dict(model, strict=True)
    assert sorted(proj) == [f"projectors.0.{i}.{p}" for i in (0, 2, 4) for p in ("bias", "weight")]
    assert proj["projectors.0.4.weight"].shape == (64, 64)  # the digits encoder's width
    r = run([sys.executable, SAMPLE_DDP,
             "--ckpt", repa_run, "--num_samples", "20", "--per_proc_batch_size", "20", "--num_sampling_steps", "5",
             "--device", "cpu", "--sample_dir", str(tmp_path / "s")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert any(f.endswith(".npz") for _, _, files in os.walk(tmp_path) for f in files), r.stdout[-2000:]
    r = run([sys.executable, SAMPLE_DIT, "--ckpt", ckpt, "--num_sampling_steps", "5", "--device", "cpu",
             "--labels", "1,2", "--out", str(tmp_path / "grid.png")])
    assert r.returncode == 0 and os.path.isfile(tmp_path / "grid.png"), r.stderr[-3000:]
    pytest.importorskip("diffusers")
    r = run([sys.executable, "-m", "opendit", "convert", ckpt, str(tmp_path / "diffusers")])
    assert r.returncode == 0 and os.path.isfile(tmp_path / "diffusers" / "config.json"), r.stderr[-3000:]


def test_grad_checkpointing_and_compile_give_the_same_repa_step():
    from opendit.diffusion import create_diffusion
    from opendit.distributed import DistEnv
    from opendit.precision import Precision
    from opendit.training.ema import EMA
    from opendit.training.optim import build_optimizer
    from opendit.training.step import train_step

    results = []
    for option in ("plain", "grad_checkpoint", "compile"):
        model = tiny_dit().set_grad_checkpoint(option == "grad_checkpoint")
        if option == "compile":  # as parallelize.apply_compile, traced by AOTAutograd (no C++ toolchain needed)
            torch._dynamo.reset()
            for block in model.blocks:
                block.compile(backend="aot_eager")
        loss = RepaLoss(attach_projectors(model, [6], width=16, seed=0), depth=2, weight=0.5, grid=(4, 4))
        g = torch.Generator().manual_seed(3)
        x = torch.randn(4, 1, 8, 8, generator=g)
        batch = StepBatch(x, torch.tensor([1, 2, 3, 4]), torch.tensor([1, 10, 100, 900]), None,
                          torch.randn(4, 1, 8, 8, generator=g), features=[torch.randn(4, 16, 6, generator=g)])
        opt = build_optimizer(model, 1e-3, torch.device("cpu"))
        ema = EMA(model)
        r = train_step(model, model, opt, create_diffusion(""), batch, lr=1e-3, grad_clip=1.0,
                       precision=Precision("fp32", torch.device("cpu")), ema=ema, ema_decay=0.9, env=DistEnv(),
                       aux_losses=(loss,))
        results.append((r, dict(model.named_parameters()), ema))
    (a, pa, ea), (b, pb, eb), (c, pc, ec) = results
    assert a.loss == b.loss and a.aux["repa"] == b.aux["repa"] and a.grad_norm == b.grad_norm
    assert all(torch.equal(pa[n], pb[n]) for n in pa)  # projectors included: they are trained with the model
    assert not any(n.startswith("projectors.") for n in ea.names)  # and not averaged
    # the compiled blocks' decomposed ops may round differently: fp32 ulps, then one AdamW step of lr 1e-3
    torch.testing.assert_close(c.loss, a.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(c.aux["repa"], a.aux["repa"], rtol=1e-5, atol=0)
    assert c.aux["repa"] != 0 and all(torch.allclose(pc[n], pa[n], rtol=0, atol=1e-5) for n in pa)


@pytest.mark.parametrize("case", ["depth_too_deep", "without_encoder", "unknown_encoder", "missing_weights",
                                  "missing_hub_file", "weights_for_digits", "bad_factory"])
def test_bad_repa_input_is_one_line_and_exit_2(case, tmp_path):
    argv = {
        "depth_too_deep": [*TINY, "--repa_encoder", "digits", "--repa_depth", "5"],
        "without_encoder": [*TINY, "--repa_lambda", "1.0"],
        "unknown_encoder": [*TINY, "--repa_encoder", "dino"],
        "missing_weights": [*TINY, "--repa_encoder", "dinov2-vit-b", "--repa_depth", "2", "--repa_encoder_weights",
                            str(tmp_path / "dinov2_vitb14_pretrain.pth")],
        "missing_hub_file": [*TINY, "--repa_encoder", "dinov2-vit-b", "--repa_depth", "2"],
        "weights_for_digits": [*TINY, "--repa_encoder", "digits", "--repa_depth", "2", "--repa_encoder_weights", "x.pt"],
        "bad_factory": [*TINY, "--repa_encoder", "no_such_module:factory", "--repa_depth", "2"],
    }[case]
    r = run_train(*argv, "--max_steps", "1", "--batch_size", "8", "--outputs", str(tmp_path / "out"),
                  env_extra={"TORCH_HOME": str(tmp_path / "torch")})  # offline (the helpers set OPENDIT_OFFLINE)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert not os.path.exists(tmp_path / "out") or not os.listdir(tmp_path / "out")
    want = {"depth_too_deep": "--repa_depth 5", "without_encoder": "add --repa_encoder",
            "unknown_encoder": "unknown --repa_encoder", "missing_weights": "dinov2_vitb14_pretrain.pth",
            "missing_hub_file": f"put it at {tmp_path / 'torch' / 'hub' / 'checkpoints' / 'dinov2_vitb14_pretrain.pth'}",
            "weights_for_digits": "takes no weights file", "bad_factory": "cannot import"}[case]
    assert want in lines[0]


def test_a_repa_step_s_alignment_loss_equals_repa_s_own(tmp_path, monkeypatch):
    """The alignment term of our step (encoder features of 256 px images, the tokens after block 2, the projector,
    RepaLoss) equals REPA's on the same weights and inputs: zs from its encoder pipeline (repa_targets), zs_tilde from
    its SiT.forward (projector applied to x.reshape(-1, D) after block encoder_depth), proj_loss as loss.py SILoss
    computes it (mean_flat of -cos per sample, summed over encoders and samples, / (len(zs) * bsz))."""
    sd, file, name = small_dinov2(monkeypatch, tmp_path, "b", 0)
    torch.manual_seed(0)
    model = DiT(input_size=32, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, num_classes=10)
    projectors = attach_projectors(model, [32], width=64, seed=0)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    raw = torch.randint(0, 256, (2, 3, 256, 256), generator=g).float()
    latents, noise = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 4, 32, 32, generator=g)
    t_repa, y = torch.tensor([0.3, 0.8]), torch.tensor([3, 9])
    x_t = (1 - t_repa).view(-1, 1, 1, 1) * latents + t_repa.view(-1, 1, 1, 1) * noise  # REPA: 0 = data

    # ours
    feats = encode(build_encoders(name, str(file), "cpu", 256), raw / 127.5 - 1)
    _, hidden = model(x_t, t_repa, y, return_hidden=(2,))
    batch = StepBatch(latents, y, t_repa, None, latents, features=feats)
    ours = RepaLoss(projectors, depth=2, weight=0.5, grid=model.x_embedder.grid_size)(hidden, batch)

    # REPA's: SiT.forward up to encoder_depth = 2, then SILoss's projection loss
    zs = [repa_targets(sd, raw, 2, 0)]
    with torch.no_grad():
        x = model.x_embedder(x_t) + model.pos_embed
        n, t, d = x.shape
        c = model.t_embedder(t_repa) + model.y_embedder(y, False)
        for i, block in enumerate(model.blocks):
            x = block(x, c)
            if i + 1 == 2:
                zs_tilde = [proj(x.reshape(-1, d)).reshape(n, t, -1) for proj in model.projectors]
                break
        proj_loss = 0.0
        for z, z_tilde in zip(zs, zs_tilde):
            for z_j, z_tilde_j in zip(z, z_tilde):
                z_tilde_j = torch.nn.functional.normalize(z_tilde_j, dim=-1)
                z_j = torch.nn.functional.normalize(z_j, dim=-1)
                proj_loss += torch.mean(-(z_j * z_tilde_j).sum(dim=-1))
        proj_loss /= len(zs) * n
    assert ours.item() == pytest.approx(float(proj_loss), rel=1e-5, abs=1e-6)

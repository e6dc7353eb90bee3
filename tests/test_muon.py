"""--optimizer muon: Muon on the blocks' matrices and AdamW on the rest, against torch's own torch.optim.Muon
(``adjust_lr_fn="match_rms_adamw"``, weight decay 0: the released update with Moonshot's RMS scale) and
torch.optim.AdamW on the same gradients; which parameters go where; the same losses on 1 and 2 processes under
ddp, zero2 and fsdp; resume."""

import copy
import os

import pytest
import torch

from helpers import TINY, only_run_dir, read_metrics, run_train
from opendit.models import DiT
from opendit.training.muon import MuonAdamW, muon_parameter, newton_schulz
from opendit.training.optim import build_optimizer

CPU = torch.device("cpu")


def tiny_dit():
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every weight nonzero (adaLN-Zero starts at 0)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()  # no random label dropout: both copies see the same batch


def test_the_update_equals_torchs_muon_and_adamw():
    model, ref = tiny_dit(), tiny_dit()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ref_named = dict(ref.named_parameters())
    opt = build_optimizer(model, 2e-3, CPU, beta2=0.95, name="muon")
    muon_names = [n for n, p in named if muon_parameter(n, p)]
    ref_muon = torch.optim.Muon([ref_named[n] for n in muon_names], lr=2e-3, weight_decay=0.0, momentum=0.95,
                                nesterov=True, adjust_lr_fn="match_rms_adamw")
    ref_adam = torch.optim.AdamW([ref_named[n] for n, _ in named if n not in muon_names], lr=2e-3,
                                 betas=(0.9, 0.95), weight_decay=0.0, foreach=False)
    x, y, t = torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 4]), torch.tensor([10, 200, 500, 900])
    for step in range(3):  # momentum and Adam's moments carry over steps
        for m, opts in ((model, (opt,)), (ref, (ref_muon, ref_adam))):
            for o in opts:
                o.zero_grad()
            (m(x * (step + 1), t, y) ** 2).mean().backward()
            for o in opts:
                o.step()
        for n, p in model.named_parameters():
            # the same operations in the same order as torch's single-tensor Muon and AdamW: bit for bit
            torch.testing.assert_close(p, ref_named[n], rtol=0, atol=0, msg=n)
    assert len(muon_names) == 2 * 5  # per block: qkv, proj, fc1, fc2, adaLN
    assert not any(n.startswith(("x_embedder", "t_embedder", "y_embedder", "final_layer")) for n in muon_names)


def test_which_parameters_muon_updates():
    """The blocks' 2-D matrices; not REPA's projectors, MeanFlow's second time embedder, the other embedders, the
    final layer, biases or gains."""
    yes = ["blocks.0.attn.qkv.weight", "blocks.3.mlp.w12.weight", "blocks.1.adaLN_modulation.1.weight",
           "blocks.0._checkpoint_wrapped_module.mlp.fc1.weight"]
    no = ["projectors.0.0.weight", "h_embedder.mlp.0.weight", "t_embedder.mlp.2.weight",
          "y_embedder.embedding_table.weight", "final_layer.linear.weight", "blocks.0.attn.qkv.bias",
          "blocks.0.norm1.weight"]
    assert all(muon_parameter(n, torch.zeros(4, 4)) for n in yes)
    assert not any(muon_parameter(n, torch.zeros(4, 4) if "bias" not in n and "norm" not in n else torch.zeros(4))
                   for n in no)


def test_newton_schulz_approximately_orthogonalizes():
    g = torch.Generator().manual_seed(0)
    for shape in ((16, 48), (48, 16)):
        m = torch.randn(*shape, generator=g)
        o = newton_schulz(m).float()
        s = torch.linalg.svdvals(o)
        # the released quintic's fixed point band: singular values roughly in [0.7, 1.2], not exactly 1
        assert s.min() > 0.5 and s.max() < 1.3, s
        u, _, vh = torch.linalg.svd(m, full_matrices=False)  # the exact orthogonal factor U V^T
        assert torch.nn.functional.cosine_similarity(o.flatten(), (u @ vh).flatten(), dim=0) > 0.95


def test_a_state_dict_round_trip_continues_identically():
    a, b = tiny_dit(), tiny_dit()
    oa = MuonAdamW([p for n, p in a.named_parameters() if muon_parameter(n, p)],
                   [p for n, p in a.named_parameters() if not muon_parameter(n, p)], lr=1e-3)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([5, 600]), torch.tensor([0, 9])
    (a(x, t, y) ** 2).mean().backward()
    oa.step()
    b.load_state_dict(a.state_dict())
    ob = MuonAdamW([p for n, p in b.named_parameters() if muon_parameter(n, p)],
                   [p for n, p in b.named_parameters() if not muon_parameter(n, p)], lr=1e-3)
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))  # as a checkpoint would hold it (not shared tensors)
    for m, o in ((a, oa), (b, ob)):
        o.zero_grad()
        (m(x, t, y) ** 2).mean().backward()
        o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.slow
def test_two_processes_match_one_under_each_plugin(tmp_path):
    """Muon on sharded parameters gathers each matrix: zero2 and fsdp on 2 processes log the losses of one process
    (the same global batch), as ddp does."""
    from opendit.checkpoint import list_checkpoints, load_checkpoint

    common = [*TINY, "--optimizer", "muon", "--ema_std", "0.1", "--max_steps", "6", "--log_every", "1",
              "--ckpt_every", "3", "--ckpt_keep", "0"]
    one = run_train(*common, "--batch_size", "32", "--outputs", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    ref = {s: m["loss"] for s, m in read_metrics(only_run_dir(tmp_path / "one")).items()}
    assert sorted(ref) == list(range(1, 7))
    ref_ema = load_checkpoint(list_checkpoints(only_run_dir(tmp_path / "one"))[-1])["ema"]
    for plugin in ("ddp", "zero2", "fsdp"):
        r = run_train(*common, "--batch_size", "16", "--plugin", plugin, "--outputs", str(tmp_path / plugin), nproc=2)
        assert r.returncode == 0, r.stderr[-3000:]
        got = {s: m["loss"] for s, m in read_metrics(only_run_dir(tmp_path / plugin)).items()}
        for s in ref:  # fp32 gradients; the bf16 orthogonalization sees the same matrices up to reduction order
            assert got[s] == pytest.approx(ref[s], rel=1e-4), (plugin, s)
        ema = load_checkpoint(list_checkpoints(only_run_dir(tmp_path / plugin))[-1])["ema"]
        # the power-function EMA of the (sharded) weights is the 1-process one, up to Muon's bf16 arithmetic:
        # gradients that differ in their last fp32 bits (reduction order) round differently in the bf16
        # Newton-Schulz iteration, and orthogonalization lifts a matrix's small singular directions to full size, so
        # the zero-initialized adaLN matrices' EMAs drift apart by a few percent of their (tiny) size in 6 steps. Over
        # the whole model that stays < 1e-3 relative; a wrong shard of an update (half the rows an update apart,
        # ~lr x 0.2 sqrt(512) x 0.05 per element per step) would be ~5e-2
        diff = sum(float((ema[k] - ref_ema[k]).norm()) ** 2 for k in ref_ema) ** 0.5
        size = sum(float(ref_ema[k].norm()) ** 2 for k in ref_ema) ** 0.5
        assert diff < 1e-3 * size, (plugin, diff / size)


@pytest.mark.parametrize("argv,message", [
    (["--optimizer", "muon", "--optimizer_impl", "fused"], "--optimizer muon has one implementation"),
    (["--optimizer", "lion"], "invalid choice"),
    (["--ema_std", "0.5"], "--ema_std"),
    (["--ema_std", "0"], "--ema_std"),
])
def test_bad_optimizer_and_ema_input_is_one_line_and_exit_2(argv, message, tmp_path):
    r = run_train(*TINY, "--max_steps", "1", "--batch_size", "8", "--outputs", str(tmp_path), *argv)
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not os.path.exists(tmp_path) or not os.listdir(tmp_path)


def test_a_muon_run_with_the_power_ema_resumes_exactly(tmp_path):
    """6 steps straight, and 3 + 3 resumed from the step-3 checkpoint (Muon's momentum, AdamW's moments and the
    power-function EMA come back): the same losses, weights and EMA bit for bit."""
    import shutil

    from opendit.checkpoint import list_checkpoints, load_checkpoint

    common = [*TINY, "--optimizer", "muon", "--ema_std", "0.1", "--batch_size", "32", "--log_every", "1",
              "--max_steps", "6", "--ckpt_keep", "0"]
    full = run_train(*common, "--ckpt_every", "3", "--outputs", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    ckpts = list_checkpoints(only_run_dir(tmp_path / "full"))
    part = tmp_path / "part" / "000-DiT-N-2"
    part.mkdir(parents=True)
    shutil.copytree(ckpts[0], part / os.path.basename(ckpts[0]))
    resumed = run_train(*common, "--ckpt_every", "100", "--load", str(part), "--outputs", str(tmp_path / "unused"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    m_full, m_res = read_metrics(only_run_dir(tmp_path / "full")), read_metrics(str(part))
    assert sorted(m_res) == [4, 5, 6]
    for s in m_res:
        assert m_res[s]["loss"] == m_full[s]["loss"], s
    a, b = load_checkpoint(ckpts[-1]), load_checkpoint(list_checkpoints(str(part))[-1])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]) and torch.equal(a["ema"][k], b["ema"][k]), k

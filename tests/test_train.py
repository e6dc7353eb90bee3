import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY, only_run_dir, read_metrics, run_train
from opendit.checkpoint import list_checkpoints, load_checkpoint
from opendit.training.ema import EMA
from opendit.models import DiT_models


def test_ddp_two_processes_match_one_process(tmp_path):
    common = [*TINY, "--max_steps", "6", "--log_every", "1", "--ckpt_every", "100", "--plugin", "ddp"]
    two = run_train(*common, "--batch_size", "16", "--outputs", str(tmp_path / "two"), nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_train(*common, "--batch_size", "32", "--outputs", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    m2 = read_metrics(only_run_dir(tmp_path / "two"))
    m1 = read_metrics(only_run_dir(tmp_path / "one"))
    assert sorted(m1) == sorted(m2) == list(range(1, 7))
    # Same global batch, same per-sample noise: only the order of the gradient sum differs
    # (DDP averages two half-batch means), which fp32 + Adam keeps within ~1e-6 relative over 6 steps.
    for s in m1:
        assert m2[s]["loss"] == pytest.approx(m1[s]["loss"], rel=1e-5), s
    cfg = json.load(open(os.path.join(only_run_dir(tmp_path / "two"), "config.json")))
    assert cfg["world_size"] == 2 and cfg["global_batch"] == 32
    # and the trained weights agree
    w2 = load_file(os.path.join(list_checkpoints(only_run_dir(tmp_path / "two"))[-1], "model", "model.safetensors"))
    w1 = load_file(os.path.join(list_checkpoints(only_run_dir(tmp_path / "one"))[-1], "model", "model.safetensors"))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)


def test_resume_gives_the_same_losses(tmp_path):
    # batch 256 on 1,797 digits: 7 steps per epoch, so the run crosses an epoch boundary after the resume point
    common = [*TINY, "--batch_size", "256", "--log_every", "1", "--max_steps", "10", "--ckpt_keep", "0"]
    full = run_train(*common, "--ckpt_every", "5", "--outputs", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    full_dir = only_run_dir(tmp_path / "full")
    ckpts = list_checkpoints(full_dir)
    assert [os.path.basename(c) for c in ckpts] == ["epoch0-global_step5", "epoch1-global_step10"]

    # resume from step 5 in a copy of the run that holds only that checkpoint
    part_dir = tmp_path / "part" / "000-DiT-N-2"
    part_dir.mkdir(parents=True)
    shutil.copytree(ckpts[0], part_dir / "epoch0-global_step5")
    resumed = run_train(*common, "--ckpt_every", "100", "--load", str(part_dir), "--outputs", str(tmp_path / "unused"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (tmp_path / "unused").exists()  # a resumed run continues in its own run directory
    m_full, m_res = read_metrics(full_dir), read_metrics(part_dir)
    assert sorted(m_res) == [6, 7, 8, 9, 10]
    for s in m_res:  # same process layout, same inputs: bitwise-identical arithmetic
        assert m_res[s]["loss"] == m_full[s]["loss"], s
    a = load_checkpoint(ckpts[-1])
    b = load_checkpoint(list_checkpoints(str(part_dir))[-1])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    assert a["running_states"]["epoch"] == b["running_states"]["epoch"] == 1


def test_checkpoint_layout(tmp_path):
    r = run_train(*TINY, "--batch_size", "64", "--max_steps", "6", "--ckpt_every", "2", "--ckpt_keep", "2",
                  "--log_every", "3", "--outputs", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    assert os.path.basename(run_dir) == "000-DiT-N-2"
    names = sorted(os.listdir(run_dir))
    assert "config.json" in names and "log.txt" in names and "latest" in names
    assert not [n for n in names if n.startswith(".tmp")]
    ckpts = [os.path.basename(c) for c in list_checkpoints(run_dir)]
    assert ckpts == ["epoch0-global_step4", "epoch0-global_step6"]  # keep the last 2
    assert open(os.path.join(run_dir, "latest")).read().strip() == "epoch0-global_step6"
    c = os.path.join(run_dir, ckpts[-1])
    assert sorted(os.listdir(c)) == ["ema.pt", "manifest.json", "model", "optimizer", "running_states.json"]
    manifest = json.load(open(os.path.join(c, "manifest.json")))["files"]
    assert sorted(manifest) == ["ema.pt", "model/model.safetensors", "optimizer/optimizer.pt", "running_states.json"]
    for rel, entry in manifest.items():
        assert os.path.getsize(os.path.join(c, rel)) == entry["bytes"] and len(entry["sha256"]) == 64
    ema = torch.load(os.path.join(c, "ema.pt"), weights_only=True)  # a plain fp32 state dict
    model = DiT_models["DiT-N/2"](input_size=8, in_channels=1, num_classes=10)
    assert list(ema) == list(model.state_dict())
    assert all(v.dtype == torch.float32 for v in ema.values())
    model.load_state_dict(ema, strict=True)
    weights = load_file(os.path.join(c, "model", "model.safetensors"))
    assert set(weights) == set(ema)
    opt = torch.load(os.path.join(c, "optimizer", "optimizer.pt"), weights_only=True)
    assert "state" in opt and "param_groups" in opt
    rs = json.load(open(os.path.join(c, "running_states.json")))
    assert rs["global_step"] == 6 and rs["epoch"] == 0 and rs["epoch_offset"] == 6 * 64 and rs["step_in_epoch"] == 6
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    assert cfg["num_classes"] == 10 and cfg["image_size"] == 8 and cfg["in_channels"] == 1
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert "GFLOP per image" in log and "global batch 64" in log and "step 6/6" in log


def test_ema_math():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    model.register_parameter("frozen", frozen)
    p0 = model.weight.detach().clone()
    ema = EMA(model)
    d = 0.9
    history = [p0]
    for k in range(1, 6):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        history.append(model.weight.detach().clone())
        ema.update(d)
    # closed form: ema_N = d^N p_0 + sum_{k=1..N} (1 - d) d^(N-k) p_k
    N = 5
    expected = d**N * history[0] + sum((1 - d) * d ** (N - k) * history[k] for k in range(1, N + 1))
    sd = ema.state_dict()
    torch.testing.assert_close(sd["weight"], expected, rtol=1e-6, atol=1e-6)
    assert not sd["weight"].requires_grad
    assert torch.equal(sd["frozen"], frozen)  # frozen parameters are taken from the model, not averaged
    assert set(sd) == {"weight", "bias", "frozen"}
    ema.update(0.0)
    assert torch.equal(ema.state_dict()["weight"], model.weight)


def test_final_sample_grid_and_tensorboard(tmp_path):
    r = run_train(*TINY, "--batch_size", "32", "--max_steps", "2", "--final_samples", "2", "--outputs", str(tmp_path),
                  process=True)  # the whole program as a process, end to end
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    from PIL import Image

    grid = Image.open(os.path.join(run_dir, "samples.png"))
    assert grid.height >= 10 * 64  # one labelled row per class
    pytest.importorskip("tensorboard")
    assert os.listdir(os.path.join(run_dir, "tensorboard"))


def test_latent_space_training_through_a_local_vae(tmp_path):
    """--vae PATH: a tiny randomly initialised diffusers AutoencoderKL (no download), 16 px images -> 4x8x8 latents."""
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=16,
    )
    vae.save_pretrained(str(tmp_path / "vae"))
    from test_data import write_cifar

    write_cifar(tmp_path / "data", per_batch=4)
    r = run_train("--dataset", "cifar10", "--data_path", str(tmp_path / "data"), "--image_size", "16", "--vae",
                  str(tmp_path / "vae"), "--model", "DiT-N/2", "--mixed_precision", "fp32", "--device", "cpu",
                  "--batch_size", "4", "--max_steps", "2", "--final_samples", "1", "--outputs", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = only_run_dir(tmp_path / "out")
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    assert (cfg["in_channels"], cfg["input_size"]) == (4, 8)
    ema = torch.load(os.path.join(list_checkpoints(run_dir)[-1], "ema.pt"), weights_only=True)
    assert ema["x_embedder.proj.weight"].shape[1] == 4
    assert os.path.exists(os.path.join(run_dir, "samples.png"))  # decoded through the VAE


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_runs_at_tiny_size(tmp_path, precision):
    # CPU low-precision matmuls are slow: a tiny model, 3 steps. fp16 goes through the gradient scaler.
    r = run_train(*[a for a in TINY if a != "fp32" and a != "--mixed_precision"], "--mixed_precision", precision,
                  "--batch_size", "16", "--max_steps", "3", "--log_every", "1", "--outputs", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    from opendit.precision import cpu_has_fast_bf16

    assert ("warning: --mixed_precision" in r.stderr) == (not cpu_has_fast_bf16())  # a CPU without AMX says so
    run_dir = only_run_dir(tmp_path)
    losses = [m["loss"] for m in read_metrics(run_dir).values()]
    assert len(losses) == 3 and all(0 < v < 10 for v in losses)
    rs = json.load(open(os.path.join(list_checkpoints(run_dir)[-1], "running_states.json")))
    assert (rs["grad_scaler"] is not None) == (precision == "fp16")


def test_extending_a_finished_cosine_run_says_what_the_learning_rate_will_be(tmp_path):
    common = [*TINY, "--batch_size", "8", "--lr_schedule", "cosine", "--log_every", "1", "--ckpt_every", "10",
              "--outputs", str(tmp_path)]
    assert run_train(*common, "--max_steps", "10").returncode == 0
    run_dir = only_run_dir(tmp_path)
    r = run_train(*common, "--max_steps", "11", "--load", run_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    # cosine over 11 steps, resumed at step 10 (also the last): 1e-3 * (1 + cos(pi * 10 / 11)) / 2 = 2.0e-05
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert "note: the cosine schedule is resumed at step 10 of 11: the learning rate runs from 2e-05 down to 2e-05" in log
    assert "--lr_schedule constant --lr LR" in log

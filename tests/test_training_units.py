"""The trainer's parts, in-process: the step against a hand-written step, skipped steps, auxiliary losses on hidden
tokens, the step's randomness across ranks, the resumable state, resume, the schedule, atomic writes, the space."""

import math
import os

import pytest
import torch

from opendit.atomic import atomic_path, write_text_atomic
from opendit.diffusion import create_diffusion
from opendit.distributed import DistEnv
from opendit.errors import UserError
from opendit.models import DiT
from opendit.parallelize import ModelOptions, apply_activation_checkpointing, apply_kernels, parallelize_dit
from opendit.precision import Precision
from opendit.space import check_patch, sampling_space, training_space
from opendit import checkpoint as ckpt
from opendit.training.ema import EMA
from opendit.training.optim import build_optimizer, learning_rate
from opendit.training.randomness import draw_step_randomness, step_seed
from opendit.training.resume import restore
from opendit.training.state import TrainState
from opendit.training.step import StepBatch, train_step

CPU = torch.device("cpu")
ENV = DistEnv()


def tiny_dit(depth=3, **kw) -> DiT:
    torch.manual_seed(0)
    return DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=depth, num_heads=2, num_classes=10, **kw)


def randomize(model: DiT) -> DiT:
    """adaLN-Zero starts every block as the identity and the output at 0: give every weight a value so that
    gradients reach every block."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def a_batch(n=6, seed=0, drop=True) -> StepBatch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    return StepBatch(x, y, t, (torch.rand(n, generator=g) < 0.3) if drop else None, torch.randn(n, 1, 8, 8, generator=g))


def step_once(model, batch, aux=(), clip=1.0, lr=1e-3, objective=None):
    opt = build_optimizer(model, lr, CPU)
    ema = EMA(model)
    r = train_step(model, model, opt, objective or create_diffusion(""), batch, lr=lr, grad_clip=clip,
                   precision=Precision("fp32", CPU), ema=ema, ema_decay=0.9, env=ENV, aux_losses=aux, step_number=1)
    return r, opt, ema


def test_train_step_equals_a_hand_written_step():
    """loss -> backward -> clip -> AdamW -> EMA, written out with plain torch calls, gives the same weights bit for bit."""
    batch, diffusion = a_batch(), create_diffusion("")
    ours = randomize(tiny_dit())
    r, _, ema = step_once(ours, batch, clip=0.5, lr=3e-3)

    ref = randomize(tiny_dit())
    shadow = {n: p.detach().clone() for n, p in ref.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=3e-3, weight_decay=0)
    loss = diffusion.training_losses(ref, batch.x, batch.t, dict(y=batch.y, force_drop_ids=batch.drop),
                                     noise=batch.noise)["loss"].mean()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    opt.step()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if p.requires_grad:
                shadow[n].lerp_(p, 0.1)

    assert r.updated and not r.skipped and not r.stop and r.loss == loss.detach() and r.grad_norm == norm
    assert norm > 0.5  # the clip did something
    for (n, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), n
    sd = ema.state_dict()
    for n, v in shadow.items():
        assert torch.equal(sd[n], v), n


class NaNObjective:
    def __init__(self):
        self.diffusion = create_diffusion("")

    def training_losses(self, model, x, t=None, model_kwargs=None, noise=None):
        out = self.diffusion.training_losses(model, x, t, model_kwargs, noise=noise)
        return {"loss": out["loss"] * float("nan")}


def test_a_non_finite_loss_skips_the_update():
    model = randomize(tiny_dit())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r, opt, ema = step_once(model, a_batch(), objective=NaNObjective())
    assert r.skipped and not r.updated and r.nonfinite_loss
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not opt.state  # AdamW never stepped
    assert all(torch.equal(v, before[k]) for k, v in ema.state_dict().items())


class HiddenNorm:
    """A toy auxiliary loss: the mean square of the tokens after block ``depth``."""

    name, weight = "hidden_norm", 0.25

    def __init__(self, depth):
        self.depths = (depth,)

    def __call__(self, hidden, batch):
        return hidden[self.depths[0]].pow(2).mean()


def test_return_hidden_gives_the_blocks_outputs_and_the_same_output():
    model = randomize(tiny_dit()).eval()
    b = a_batch()
    plain = model(b.x, b.t, b.y)
    out, hidden = model(b.x, b.t, b.y, return_hidden=(1, 3))
    assert torch.equal(out, plain) and set(hidden) == {1, 3}
    x = model.x_embedder(b.x) + model.pos_embed  # by hand, block by block
    c = model.t_embedder(b.t) + model.y_embedder(b.y, False)
    for k, block in enumerate(model.blocks, start=1):
        x = block(x, c)
        if k in hidden:
            assert torch.equal(hidden[k], x)
    with pytest.raises(ValueError, match="no block 4"):
        model(b.x, b.t, b.y, return_hidden=(4,))


def test_an_auxiliary_loss_adds_its_weighted_value_and_its_gradient_stops_at_its_block():
    batch = a_batch()
    model = randomize(tiny_dit())
    aux = HiddenNorm(depth=2)
    opt = build_optimizer(model, 1e-3, CPU)
    r = train_step(model, model, opt, create_diffusion(""), batch, lr=0.0, grad_clip=0.0, precision=Precision("fp32", CPU),
                   ema=EMA(model), ema_decay=0.9, env=ENV, aux_losses=(aux,))
    with torch.no_grad():  # lr 0: the weights are unchanged, the naive values can be recomputed
        base = create_diffusion("").training_losses(model, batch.x, batch.t, dict(y=batch.y, force_drop_ids=batch.drop),
                                                    noise=batch.noise)["loss"].mean()
        _, hidden = model(create_diffusion("").q_sample(batch.x, batch.t, noise=batch.noise), batch.t, batch.y,
                          force_drop_ids=batch.drop, return_hidden=(2,))
    naive = 0.25 * hidden[2].pow(2).mean()
    torch.testing.assert_close(r.aux["hidden_norm"], naive, rtol=1e-6, atol=0)
    torch.testing.assert_close(r.loss, base + naive, rtol=1e-6, atol=0)

    # the auxiliary loss alone: gradients in blocks 1-2 (and the embedders), none in block 3 or the final layer
    model.zero_grad()
    _, hidden = model(batch.x, batch.t, batch.y, return_hidden=(2,))
    aux(hidden, batch).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in grads if n.startswith(("blocks.0.", "blocks.1.")))
    assert all(grads[n] is None or grads[n].abs().sum() == 0 for n in grads if n.startswith(("blocks.2.", "final_layer.")))


def test_each_rank_draws_its_slice_of_the_global_batch():
    diffusion = create_diffusion("")
    draws = []
    for rank in range(2):
        g = torch.Generator().manual_seed(step_seed(7, 3))
        draws.append(draw_step_randomness(g, diffusion, 8, slice(4 * rank, 4 * rank + 4), (1, 8, 8), (4, 2, 2), 0.1, CPU))
    g = torch.Generator().manual_seed(step_seed(7, 3))
    whole = draw_step_randomness(g, diffusion, 8, slice(0, 8), (1, 8, 8), (4, 2, 2), 0.1, CPU)
    for field in ("t", "drop", "noise", "vae_eps"):
        assert torch.equal(torch.cat([getattr(d, field) for d in draws]), getattr(whole, field)), field
    assert step_seed(7, 3) != step_seed(7, 4) and step_seed(7, 3) != step_seed(8, 3)


def test_train_state_round_trip_and_older_checkpoints():
    s = TrainState(epoch=3, epoch_offset=256, global_step=40, skipped_steps=2, bad_images=1, grad_scaler={"scale": 8.0})
    d = s.state_dict(global_batch=128, world_size=2, global_seed=5)
    assert d["step_in_epoch"] == 2 and d["global_batch"] == 128 and d["world_size"] == 2 and d["global_seed"] == 5
    assert TrainState.from_state_dict(d) == s
    assert s.state_dict(global_batch=128, world_size=2, global_seed=5, bad_images=9)["bad_images"] == 9
    old = {"epoch": 1, "epoch_offset": 64, "global_step": 9}  # written before the skip counters existed
    assert TrainState.from_state_dict(old) == TrainState(1, 64, 9)
    fresh = TrainState()
    fresh.load_state_dict(d)
    assert fresh == s
    fresh.advance(128)
    fresh.next_epoch()
    assert (fresh.epoch, fresh.epoch_offset, fresh.global_step) == (4, 0, 41)
    with pytest.raises(KeyError):
        TrainState.from_state_dict({"epoch": 1})


def test_resume_restores_weights_ema_optimizer_and_counters(tmp_path):
    model = randomize(tiny_dit())
    r, opt, ema = step_once(model, a_batch())
    state = TrainState(epoch=0, epoch_offset=6, global_step=1, skipped_steps=0)
    ckpt.save_checkpoint(str(tmp_path), ckpt.checkpoint_name(0, 1), model_state=model.state_dict(),
                         ema_state=ema.state_dict(), optimizer_state=_full_osd(model, opt),
                         running_states=state.state_dict(global_batch=6, world_size=1, global_seed=0))
    fresh = tiny_dit()
    fresh_opt = build_optimizer(fresh, 1e-3, CPU)
    shapes = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    notes = []
    got, got_ema, where = restore(str(tmp_path), fresh, fresh_opt, Precision("fp32", CPU), ENV, shapes, notes)
    assert got == state and where.endswith("epoch0-global_step1") and notes == []
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(got_ema.state_dict().values(), ema.state_dict().values()))
    # the next step of both is the same: AdamW's moments came back too
    b = a_batch(seed=1)
    for m, o, e in ((model, opt, ema), (fresh, fresh_opt, got_ema)):
        train_step(m, m, o, create_diffusion(""), b, lr=1e-3, grad_clip=1.0, precision=Precision("fp32", CPU), ema=e,
                   ema_decay=0.9, env=ENV)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))

    other = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=3, num_heads=2, num_classes=10)
    with pytest.raises(UserError, match=r"\(model\) does not fit this model"):
        restore(str(tmp_path), other, build_optimizer(other, 1e-3, CPU), Precision("fp32", CPU), ENV,
                {k: tuple(v.shape) for k, v in other.state_dict().items()}, [])


def _full_osd(model, opt):
    from opendit.distributed import full_optimizer_state

    return full_optimizer_state(model, opt, ENV)


def test_learning_rate_schedule_closed_forms():
    kw = dict(lr=1.0, warmup=4, total=104)
    assert [learning_rate(s, schedule="constant", **kw) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert learning_rate(4, schedule="cosine", **kw) == 1.0
    assert learning_rate(54, schedule="cosine", **kw) == pytest.approx(0.5)
    assert learning_rate(104, schedule="cosine", **kw) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(500, schedule="cosine", **kw) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(29, schedule="cosine", **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_parallelize_applies_each_option_in_place_and_keeps_the_state_dict():
    model = tiny_dit()
    keys = list(model.state_dict())
    opts = ModelOptions(attention="eager", grad_checkpoint=True, plugin="ddp")
    out = parallelize_dit(model, opts, ENV)  # one process: no wrapper
    assert out is model and list(model.state_dict()) == keys
    assert model.attention_impl == "eager" and model.grad_checkpoint
    apply_kernels(model, ModelOptions())
    apply_activation_checkpointing(model, ModelOptions())
    assert model.attention_impl == "sdpa" and not model.grad_checkpoint
    # speed switches are not part of what a DiT is: the constructor takes none
    with pytest.raises(TypeError):
        tiny_dit(grad_checkpoint=True)
    # checkpointed blocks give the same gradients
    b = a_batch()
    grads = []
    for gc in (False, True):
        m = randomize(tiny_dit()).set_grad_checkpoint(gc)
        m(b.x, b.t, b.y).square().mean().backward()
        grads.append([p.grad for p in m.parameters() if p.requires_grad])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_atomic_writes_leave_the_old_content_on_failure(tmp_path):
    path = str(tmp_path / "stats.npz")
    write_text_atomic(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            assert tmp.endswith(".tmp.npz")
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("killed")
    assert open(path).read() == "old" and sorted(os.listdir(tmp_path)) == ["stats.npz"]
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write("new")
    assert open(path).read() == "new" and sorted(os.listdir(tmp_path)) == ["stats.npz"]
    folder = tmp_path / "dir"
    folder.mkdir()
    (folder / "a").write_text("1")
    with atomic_path(str(folder)) as tmp:
        os.makedirs(tmp)
        with open(os.path.join(tmp, "b"), "w") as f:
            f.write("2")
    assert sorted(os.listdir(folder)) == ["b"] and sorted(os.listdir(tmp_path)) == ["dir", "stats.npz"]


def test_the_space_decides_input_size_and_channels():
    px = training_space("auto", 8, 1, CPU)
    assert (px.image_size, px.input_size, px.channels, px.latent) == (8, (8, 8), 1, False)
    assert px.describe() == "input 1x8x8 (pixels)"
    assert torch.equal(px.to_images(torch.tensor([-3.0, 0.5, 2.0])), torch.tensor([-1.0, 0.5, 1.0]))
    with pytest.raises(UserError, match="not divisible by DiT-N/4's patch size 4"):
        check_patch(training_space("none", 6, 3, CPU), "DiT-N/4", 4)
    with pytest.raises(UserError, match="trained with the VAE"):
        training_space("none", 256, 3, CPU, saved={"vae_resolved": "stabilityai/sd-vae-ft-ema"}, run_dir="run")
    s = sampling_space(None, (16, 16), 3, 2, CPU)
    assert (s.image_size, s.channels) == (16, 3)
    with pytest.raises(UserError, match="--image_size 16, not 32"):
        sampling_space(None, (16, 16), 3, 2, CPU, image_size=32)


def test_a_resumed_cosine_schedule_near_its_end_says_so():
    from opendit.config.train import OptimSettings
    from opendit.training.trainer import schedule_tail_note

    args = OptimSettings(lr=2e-3, lr_schedule="cosine", warmup_steps=100)
    note = schedule_tail_note(args, 2000, 2100)  # `make demo`'s run, extended by 100 steps
    now, last = (2e-3 * (1 + math.cos(math.pi * k / 2000)) / 2 for k in (1900, 1999))  # (step - warmup) / 2000
    assert f"runs from {now:.2g} down to {last:.2g} (peak 0.002)" in note and "--lr_schedule constant" in note
    assert (f"{now:.2g}", f"{last:.2g}") == ("1.2e-05", "1.2e-09")
    assert schedule_tail_note(args, 1000, 2100) is None  # half the rate left: nothing to say
    assert schedule_tail_note(OptimSettings(lr=2e-3, lr_schedule="constant", warmup_steps=0), 2000, 2100) is None
    assert schedule_tail_note(args, 2100, 2100) is None  # nothing left to train

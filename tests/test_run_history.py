"""A run's history: retention that follows the branch being trained, ``latest`` that is never silently wrong, and a
resume that keeps the run's settings (config.json unchanged, changes recorded in history.jsonl)."""

import json
import os

import numpy as np
import pytest
import torch

from helpers import TINY, only_run_dir, read_metrics, run_train
from opendit import checkpoint as ckpt
from opendit.data import GlobalBatchPlan
from opendit.errors import UserError
from opendit.cli.train import main as train_main


def names(run_dir):
    return [os.path.basename(c) for c in ckpt.list_checkpoints(run_dir)]


def latest(run_dir):
    with open(os.path.join(run_dir, "latest")) as f:
        return f.read().strip()


def history(run_dir):
    with open(os.path.join(run_dir, "history.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_branch_back_keeps_the_new_branch_and_moves_the_old_one_aside(tmp_path):
    out = tmp_path / "out"
    r = run_train(*TINY, "--batch_size", "16", "--max_steps", "10", "--ckpt_every", "5", "--log_every", "1",
                  "--outputs", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    run = only_run_dir(out)
    assert names(run) == ["epoch0-global_step5", "epoch0-global_step10"]
    first = {s: m["loss"] for s, m in read_metrics(run).items()}

    # resume from step 5 (older than the newest, 10): the command, keeping 2 so that 6 and 8 both stay
    r = run_train("--load", os.path.join(run, "epoch0-global_step5"), "--ckpt_every", "2", "--ckpt_keep", "2",
                  "--max_steps", "8", "--log_every", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert names(run) == ["epoch0-global_step5", "epoch0-global_step6", "epoch0-global_step8"]  # 5: resumed from
    assert latest(run) == "epoch0-global_step8"
    aside = [d for d in os.listdir(run) if d.startswith("abandoned-after-epoch0-global_step5-")]
    assert len(aside) == 1 and os.listdir(os.path.join(run, aside[0])) == ["epoch0-global_step10"]
    log = open(os.path.join(run, "log.txt")).read()
    assert "a new branch of the run starts here" in log and aside[0] in log
    # --load RUN and --load auto now mean the new branch's newest checkpoint
    assert ckpt.find_resumable(run)[0] == os.path.join(run, "epoch0-global_step8")
    assert ckpt.find_auto_resume(str(out), "DiT-N/2") == run
    # the branch continues the run exactly: steps 6-8 repeat the first run's losses
    again = {s: m["loss"] for s, m in read_metrics(run).items()}
    for s in (6, 7, 8):
        assert again[s] == pytest.approx(first[s], rel=1e-6)

    # the exact scenario: --ckpt_keep 1 from step 5 again. Each new checkpoint survives its own write; the
    # one resumed from is never deleted; 6 goes only once 8 exists (keep 1)
    r = run_train("--load", os.path.join(run, "epoch0-global_step5"), "--ckpt_every", "2", "--ckpt_keep", "1",
                  "--max_steps", "8", "--log_every", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert names(run) == ["epoch0-global_step5", "epoch0-global_step8"] and latest(run) == "epoch0-global_step8"
    saves = [line for line in open(os.path.join(run, "log.txt")).read().splitlines() if "saved checkpoint" in line][-2:]
    assert saves[0].endswith("epoch0-global_step6")  # nothing deleted when 6 was written
    assert saves[1].endswith("epoch0-global_step8; deleted epoch0-global_step6 (--ckpt_keep 1)")
    assert len([d for d in os.listdir(run) if d.startswith("abandoned-after-")]) == 2  # 6 and 8 of the second branch


def _tiny_run(root, steps=(1, 2, 3)):
    run = os.path.join(root, "000-DiT-N-2")
    os.makedirs(run)
    sd = {"w": torch.zeros(2)}
    for s in steps:
        ckpt.save_checkpoint(run, ckpt.checkpoint_name(0, s), model_state=sd, ema_state=sd, optimizer_state={},
                             running_states={"epoch": 0, "epoch_offset": s, "global_step": s})
    return run


def test_latest_naming_a_missing_checkpoint_is_reported(tmp_path):
    run = _tiny_run(str(tmp_path))
    with open(os.path.join(run, "latest"), "w") as f:
        f.write("epoch0-global_step9\n")
    for fn in (lambda: ckpt.find_resumable(run), lambda: ckpt.load_weights(run)):
        with pytest.raises(UserError, match="latest names epoch0-global_step9, which is missing .*epoch0-global_step3"):
            fn()


def test_retention_never_deletes_the_new_or_the_resumed_checkpoint(tmp_path):
    run = _tiny_run(str(tmp_path), steps=(1, 2))
    sd = {"w": torch.zeros(2)}
    path, deleted = ckpt.save_checkpoint(run, "epoch0-global_step3", model_state=sd, ema_state=sd, optimizer_state={},
                                         running_states={"epoch": 0, "epoch_offset": 3, "global_step": 3}, keep=1,
                                         protect=(os.path.join(run, "epoch0-global_step1"),))
    assert deleted == ["epoch0-global_step2"] and names(run) == ["epoch0-global_step1", "epoch0-global_step3"]
    # start_branch: resuming from 1 moves 3 aside and points latest at 1
    aside, moved = ckpt.start_branch(run, os.path.join(run, "epoch0-global_step1"), "t")
    assert moved == ["epoch0-global_step3"] and os.path.isdir(os.path.join(aside, "epoch0-global_step3"))
    assert names(run) == ["epoch0-global_step1"] and latest(run) == "epoch0-global_step1"
    assert ckpt.start_branch(run, os.path.join(run, "epoch0-global_step1"), "u") == (None, [])  # nothing newer


def test_resume_keeps_the_runs_settings(tmp_path, capsys):
    common = ["--batch_size", "16", "--log_every", "1", "--ckpt_every", "5"]
    # the reference: 10 uninterrupted steps with non-default seed and learning rate
    r = run_train(*TINY, *common, "--global_seed", "3", "--lr", "2e-3", "--max_steps", "10", "--outputs",
                  str(tmp_path / "ref"))
    assert r.returncode == 0, r.stderr[-2000:]
    ref = {s: m["loss"] for s, m in read_metrics(only_run_dir(tmp_path / "ref")).items()}

    r = run_train(*TINY, *common, "--global_seed", "3", "--lr", "2e-3", "--max_steps", "5", "--outputs",
                  str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-2000:]
    run = only_run_dir(tmp_path / "out")
    config = open(os.path.join(run, "config.json")).read()

    # a defining setting that differs: one line, exit 2, nothing touched (in process: refused before any work)
    for bad, says in ((["--global_seed", "0"], "--global_seed 0: the run in"),
                      (["--batch_size", "32"], "has a global batch of 16; use --batch_size 16"),
                      (["--model", "DiT-N/4"], "was started with --model DiT-N/2"),
                      (["--dataset", "cifar10"], "was started with --dataset digits"),
                      (["--image_size", "16"], "was started with --image_size 8"),
                      (["--vae", "ema"], "was trained with the VAE none (pixel space)")):
        before = sorted(os.listdir(run)), open(os.path.join(run, "history.jsonl")).read()
        capsys.readouterr()
        assert train_main(["--load", run, "--max_steps", "10", *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
        assert (sorted(os.listdir(run)), open(os.path.join(run, "history.jsonl")).read()) == before

    # the same resume naming neither the seed nor lr nor batch: the run's own are used, and the losses of steps 6-10
    # are those of the uninterrupted run
    r = run_train("--load", run, "--max_steps", "10")
    assert r.returncode == 0, r.stderr[-2000:]
    got = {s: m["loss"] for s, m in read_metrics(run).items()}
    for s in range(6, 11):
        assert got[s] == pytest.approx(ref[s], rel=1e-6), s
    assert open(os.path.join(run, "config.json")).read() == config  # the original settings, unchanged
    rows = history(run)
    assert [r["session"] for r in rows] == ["start", "resume"]
    assert rows[1]["resumed_from"] == "epoch0-global_step5" and rows[1]["changes"] == {"max_steps": [5, 10]}
    assert rows[1]["command"][-4:] == ["--load", run, "--max_steps", "10"]

    # a changeable setting: applied, logged, recorded; the next resume inherits it
    r = run_train("--load", run, "--max_steps", "11", "--lr", "5e-4")
    assert r.returncode == 0, r.stderr[-2000:]
    assert read_metrics(run)[11]["lr"] == pytest.approx(5e-4)
    assert history(run)[2]["changes"] == {"max_steps": [10, 11], "lr": [0.002, 0.0005]}
    assert "settings changed on resume (recorded in history.jsonl): --lr 0.002 -> 0.0005, --max_steps 10 -> 11" in \
        open(os.path.join(run, "log.txt")).read()
    r = run_train("--load", run, "--max_steps", "12")
    assert r.returncode == 0, r.stderr[-2000:]
    assert read_metrics(run)[12]["lr"] == pytest.approx(5e-4)
    assert open(os.path.join(run, "config.json")).read() == config


def test_one_seed_per_epoch_visits_every_image_once():
    """Why the seed must not change on resume: one epoch of digits at global batch 16 draws 1,792 distinct images
    from one seed's permutation; switching seeds half-way (what a resume without --global_seed did) repeats about a
    quarter of them and never shows others."""
    def drawn(seed_of_step):
        out = []
        for step in range(112):
            plan = GlobalBatchPlan(1797, 16, rank=0, world_size=1, seed=seed_of_step(step), shuffle=True, flip=False)
            out.extend(plan.order(0)[0][step * 16:(step + 1) * 16].tolist())
        return np.array(out)

    kept = drawn(lambda step: 3)
    assert len(kept) == 1792 and len(set(kept.tolist())) == 1792
    mixed = drawn(lambda step: 3 if step < 56 else 0)
    assert 1792 - len(set(mixed.tolist())) > 300  # expected 896 * 896 / 1797 = 447 repeats


def test_branching_back_twice_in_the_same_second_keeps_both_abandoned_branches(tmp_path):
    run = _tiny_run(str(tmp_path))
    first, moved = ckpt.start_branch(run, os.path.join(run, "epoch0-global_step1"), "20261127-020000")
    assert moved == ["epoch0-global_step2", "epoch0-global_step3"] and first.endswith("-020000")
    sd = {"w": torch.zeros(2)}
    ckpt.save_checkpoint(run, ckpt.checkpoint_name(0, 2), model_state=sd, ema_state=sd, optimizer_state={},
                         running_states={"epoch": 0, "epoch_offset": 2, "global_step": 2})
    second, moved = ckpt.start_branch(run, os.path.join(run, "epoch0-global_step1"), "20261127-020000")
    assert moved == ["epoch0-global_step2"] and second == first + "-2"
    assert sorted(os.listdir(first)) == ["epoch0-global_step2", "epoch0-global_step3"]
    assert os.listdir(second) == ["epoch0-global_step2"]

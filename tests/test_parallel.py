"""Sharded plugins, cross-plugin checkpoints, multi-node rendezvous and the hostfile launcher, with gloo on CPU."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from helpers import REPO, TINY, TRAIN, only_run_dir, read_metrics, run, run_train
from opendit.checkpoint import list_checkpoints
from opendit.errors import UserError
from opendit.multinode import parse_hostfile

pytestmark = pytest.mark.slow  # ~2 minutes of 2-process runs

STEPS = ["--max_steps", "10", "--log_every", "1", "--ckpt_every", "5", "--ckpt_keep", "0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """10 steps of DiT-N/2 on digits at global batch 32: ddp, zero2 and fsdp on 2 processes, and 1 process."""
    root = tmp_path_factory.mktemp("plugins")
    out = {}
    for plugin in ("ddp", "zero2", "fsdp"):
        r = run_train(*TINY, *STEPS, "--batch_size", "16", "--plugin", plugin, "--outputs", str(root / plugin), nproc=2)
        assert r.returncode == 0, r.stderr[-3000:]
        out[plugin] = only_run_dir(root / plugin)
    r = run_train(*TINY, *STEPS, "--batch_size", "32", "--outputs", str(root / "single"))
    assert r.returncode == 0, r.stderr[-3000:]
    out["single"] = only_run_dir(root / "single")
    return out


def losses(run_dir):
    return {s: m["loss"] for s, m in read_metrics(run_dir).items()}


def test_sharded_plugins_match_ddp(runs):
    ref = losses(runs["ddp"])
    assert sorted(ref) == list(range(1, 11))
    for plugin in ("zero2", "fsdp", "single"):
        got = losses(runs[plugin])
        for s in ref:  # fp32, same global batch and noise: only reduction order differs
            assert got[s] == pytest.approx(ref[s], rel=1e-5), (plugin, s)


@pytest.mark.parametrize("plugin", ["zero2", "ddp"])
def test_bf16_gradient_reduction_stays_close(runs, tmp_path, plugin):
    r = run_train(*TINY, "--max_steps", "5", "--log_every", "1", "--batch_size", "16", "--plugin", plugin,
                  "--grad_reduce_dtype", "bf16", "--outputs", str(tmp_path), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    ref, got = losses(runs["ddp"]), losses(only_run_dir(tmp_path))
    # bf16 rounds each reduced gradient to 8 mantissa bits; Adam normalises, so 5 steps drift by well under 1%
    for s in got:
        assert got[s] == pytest.approx(ref[s], rel=1e-2), s
    assert any(got[s] != ref[s] for s in got)  # the option is not ignored


def test_zero2_shards_parameters_gradients_and_optimizer_state(runs):
    mem = {p: json.load(open(os.path.join(runs[p], "memory.json"))) for p in ("ddp", "zero2", "fsdp", "single")}
    assert mem["ddp"]["optim_bytes"] == mem["single"]["optim_bytes"]  # DDP replicates everything
    for plugin in ("zero2", "fsdp"):
        for key in ("optim_bytes", "grad_bytes", "param_bytes"):
            ratio = mem[plugin][key] / mem["ddp"][key]
            assert 0.45 < ratio < 0.55, (plugin, key, ratio)  # about half on each of 2 ranks


def test_ema_of_sharded_run_equals_single_process_ema(runs):
    single = torch.load(os.path.join(list_checkpoints(runs["single"])[-1], "ema.pt"), weights_only=True)
    for plugin in ("zero2", "fsdp"):
        ema = torch.load(os.path.join(list_checkpoints(runs[plugin])[-1], "ema.pt"), weights_only=True)
        assert ema.keys() == single.keys()  # consolidated, official key names
        for k in single:
            torch.testing.assert_close(ema[k], single[k], rtol=1e-4, atol=1e-6)


def resume_copy(run_dir, dest):
    """A new run directory holding only the step-5 checkpoint of ``run_dir``."""
    dest.mkdir(parents=True)
    ck = [c for c in list_checkpoints(run_dir) if c.endswith("global_step5")][0]
    shutil.copytree(ck, dest / os.path.basename(ck))
    return dest


@pytest.mark.parametrize("source,plugin,nproc", [("zero2", "ddp", 2), ("zero2", "ddp", 1), ("ddp", "zero2", 2),
                                                  ("single", "zero2", 2), ("fsdp", "zero2", 2)])
def test_checkpoints_resume_across_plugins_and_world_sizes(runs, tmp_path, source, plugin, nproc):
    d = resume_copy(runs[source], tmp_path / "000-DiT-N-2")
    r = run_train(*TINY, *STEPS, "--batch_size", str(32 // nproc), "--plugin", plugin, "--load", str(d),
                  "--outputs", str(tmp_path / "unused"), nproc=nproc)
    assert r.returncode == 0, r.stderr[-3000:]
    ref, got = losses(runs[source]), losses(str(d))
    assert sorted(got) == [6, 7, 8, 9, 10]
    for s in got:
        assert got[s] == pytest.approx(ref[s], rel=1e-5), s


def test_two_node_rendezvous_on_localhost(runs, tmp_path):
    port = free_port()
    procs = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node_rank}", "--nproc_per_node=1",
               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=opendit-test", TRAIN, *TINY, *STEPS,
               "--batch_size", "16", "--plugin", "zero2", "--outputs", str(tmp_path / "out")]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    run_dir = only_run_dir(tmp_path / "out")  # written once (global rank 0), not once per node
    assert [os.path.basename(c) for c in list_checkpoints(run_dir)] == ["epoch0-global_step5", "epoch0-global_step10"]
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    assert cfg["world_size"] == 2
    ref, got = losses(runs["ddp"]), losses(run_dir)
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-5), s


# ----------------------------------------------------------------------------- hostfile launcher

FAKE_SSH = """#!/bin/sh
# stands in for ssh: $1 is the host, the rest the remote command; "badhost" cannot be reached
host=$1; shift
[ "$host" = badhost ] && { echo "ssh: connect to host $host: Connection refused"; exit 255; }
exec sh -c "$*"
"""


def test_hostfile_parsing(tmp_path):
    f = tmp_path / "hostfile"
    f.write_text("# cluster\n111.111.111.111 # ip of node1\n\n222.222.222.222 slots=4\n")
    assert parse_hostfile(str(f), 8) == [("111.111.111.111", 8), ("222.222.222.222", 4)]
    for bad, why in (("host slots=x\n", "expected"), ("# nothing\n", "no hosts"), ("a\na\n", "twice"), ("a b\n", "expected")):
        f.write_text(bad)
        with pytest.raises(UserError, match=why):
            parse_hostfile(str(f), 8)
    with pytest.raises(UserError, match="hostfile"):
        parse_hostfile(str(tmp_path / "missing"), 8)


def _launcher(tmp_path, hosts, *extra):
    ssh = tmp_path / "fake_ssh.sh"
    ssh.write_text(FAKE_SSH)
    ssh.chmod(0o755)
    hf = tmp_path / "hostfile"
    hf.write_text(hosts)
    cmd = [sys.executable, "-m", "opendit.cli", "run", "--hostfile", str(hf), "--nproc_per_node", "1", "--ssh", str(ssh),
           "--master_port", str(free_port()), "--env", "OMP_NUM_THREADS=1", "--env", "OPENDIT_TEST_MARK=hello",
           "--workdir", REPO, *extra]
    return run(cmd, timeout=300)


def test_hostfile_launcher_two_hosts(tmp_path):
    r = _launcher(tmp_path, "127.0.0.1  # master\nlocalhost slots=1\n", "scripts/dit/train.py", *TINY,
                  "--batch_size", "16", "--max_steps", "3", "--log_every", "1", "--outputs", str(tmp_path / "out"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "[127.0.0.1]" in r.stdout  # output is prefixed with the host
    run_dir = only_run_dir(tmp_path / "out")
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    assert cfg["world_size"] == 2 and cfg["global_batch"] == 32
    assert list_checkpoints(run_dir)


def test_hostfile_launcher_stops_all_hosts_when_one_fails(tmp_path):
    r = _launcher(tmp_path, "127.0.0.1\nbadhost\n", "scripts/dit/train.py", *TINY, "--batch_size", "16",
                  "--max_steps", "3", "--outputs", str(tmp_path / "out"))
    # the master would wait for its peer forever: it is stopped, and the launcher reports the failed host
    assert r.returncode == 255
    assert "[badhost] ssh: connect to host badhost" in r.stdout
    assert "host badhost failed with exit code 255" in r.stderr


def test_launcher_passes_environment(tmp_path):
    script = tmp_path / "show_env.py"
    script.write_text("import os; print('MARK', os.environ.get('OPENDIT_TEST_MARK'), os.environ['RANK'])\n")
    r = _launcher(tmp_path, "127.0.0.1\n", str(script))
    assert r.returncode == 0, r.stderr
    assert "[127.0.0.1] MARK hello 0" in r.stdout

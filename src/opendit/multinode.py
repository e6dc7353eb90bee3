"""Multi-node launching (the library of ``opendit run``; usage and hostfile format in opendit/launch.py): parse the
hostfile, build each host's torchrun command, run them all over ssh with prefixed output, and stop every host when one
fails."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time

from .errors import UserError


def parse_hostfile(path: str, default_slots: int) -> list[tuple[str, int]]:
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError as e:
        raise UserError(f"--hostfile {path}: {e.strerror or e}") from None
    hosts = []
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        slots = default_slots
        for extra in parts[1:]:
            key, _, value = extra.partition("=")
            if key != "slots" or not value.isdigit() or int(value) < 1:
                raise UserError(f"--hostfile {path} line {number}: expected 'HOST [slots=N]', got {raw.strip()!r}")
            slots = int(value)
        hosts.append((parts[0], slots))
    if not hosts:
        raise UserError(f"--hostfile {path} lists no hosts")
    if len({h for h, _ in hosts}) != len(hosts):
        raise UserError(f"--hostfile {path} lists a host twice")
    return hosts


def remote_command(*, workdir: str, env: dict, python: str, nnodes: int, node_rank: int, nproc: int, master: str,
                   port: int, script: str, script_args: list[str]) -> str:
    env_part = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    torchrun = [python, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node_rank={node_rank}",
                f"--nproc_per_node={nproc}", f"--master_addr={master}", f"--master_port={port}", script, *script_args]
    return f"cd {shlex.quote(workdir)} && " + (f"env {env_part} " if env_part else "") + shlex.join(torchrun)


def _stream(proc: subprocess.Popen, host: str, lock: threading.Lock) -> None:
    for line in iter(proc.stdout.readline, b""):
        with lock:
            sys.stdout.write(f"[{host}] {line.decode(errors='replace')}")
            sys.stdout.flush()


def run_hosts(hosts, ssh: list[str], commands: list[str], grace: float = 10.0) -> int:
    lock = threading.Lock()
    procs = []
    for (host, _), cmd in zip(hosts, commands):
        p = subprocess.Popen([*ssh, host, cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        t = threading.Thread(target=_stream, args=(p, host, lock), daemon=True)
        t.start()
        procs.append((host, p, t))

    def stop_all():
        for _, p, _ in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.time() + grace
        for _, p, _ in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    try:
        while True:
            codes = [(h, p.poll()) for h, p, _ in procs]
            failed = [(h, c) for h, c in codes if c not in (None, 0)]
            if failed:
                host, code = failed[0]
                print(f"error: host {host} failed with exit code {code}; stopping the other hosts", file=sys.stderr)
                stop_all()
                return code
            if all(c == 0 for _, c in codes):
                return 0
            time.sleep(0.2)
    except KeyboardInterrupt:
        stop_all()
        return 130
    finally:
        for _, _, t in procs:
            t.join(timeout=2)


def launch(*, hostfile: str, script: str, script_args: list[str], nproc_per_node: int = 8, master_port: int = 29500,
           ssh: str = "ssh", env: list[str] = (), workdir: str = ".", python: str = "python") -> int:
    """The body of ``opendit run``: ``script`` with ``script_args`` under torchrun on every host of ``hostfile``;
    ``env``: NAME (this shell's value) or NAME=VALUE entries to pass."""
    env_items = env
    hosts = parse_hostfile(hostfile, nproc_per_node)
    env = {}
    for item in env_items:
        name, eq, value = item.partition("=")
        if not name.isidentifier():
            raise UserError(f"--env {item!r}: expected NAME or NAME=VALUE")
        env[name] = value if eq else os.environ.get(name, "")
    ssh = shlex.split(ssh)
    if not ssh:
        raise UserError("--ssh is empty")
    master = hosts[0][0]
    commands = [remote_command(workdir=workdir, env=env, python=python, nnodes=len(hosts), node_rank=i,
                               nproc=slots, master=master, port=master_port, script=script,
                               script_args=script_args) for i, (_, slots) in enumerate(hosts)]
    print(f"launching on {len(hosts)} host(s), {sum(s for _, s in hosts)} processes, master {master}:{master_port}")
    return run_hosts(hosts, ssh, commands)

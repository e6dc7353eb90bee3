"""Start a training script on every host of a hostfile: torchrun over ssh.

    opendit run --hostfile hostfile --nproc_per_node 8 scripts/dit/train.py --model DiT-XL/2 --batch_size 2

hostfile: one host per line, `#` starts a comment, an optional `slots=N` sets that host's process count:

    111.111.111.111        # node 1 (the first host is the rendezvous master)
    222.222.222.222 slots=4

Host i runs `cd WORKDIR && env VARS python -m torch.distributed.run --nnodes N --node_rank i --nproc_per_node SLOTS
--master_addr HOST0 --master_port PORT SCRIPT ARGS` through `--ssh` (default "ssh"; e.g. "ssh -p 2222"). Each host's
output is streamed with a `[host]` prefix; when one host fails, the others are stopped and the launcher exits with its code.
"""

from __future__ import annotations

import os
import sys

from ..errors import POSITIVE_INT, int_flag
from ..multinode import launch
from .program import ArgumentParser, run_main


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="opendit run", description="Run a training script with torchrun on every host of a hostfile.")
    p.add_argument("--hostfile", required=True)
    p.add_argument("--nproc_per_node", type=POSITIVE_INT, default=8, help="processes per host (a host's slots=N overrides it)")
    p.add_argument("--master_port", type=int_flag(1, 65535), default=29500)
    p.add_argument("--ssh", default="ssh", help='the remote shell command, e.g. "ssh -p 2222 -o BatchMode=yes"')
    p.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                   help="environment to pass (repeatable): NAME takes this shell's value, NAME=VALUE sets it")
    p.add_argument("--workdir", default=os.getcwd(), help="directory to run in on every host (default: this one)")
    p.add_argument("--python", default=sys.executable, help="the python that has opendit and torch on every host")
    p.add_argument("script")
    p.add_argument("script_args", nargs="...")
    return p


def main(argv=None) -> int:
    return run_main(lambda args: launch(**vars(args)), build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

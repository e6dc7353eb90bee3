"""Explore a checkpoint in the browser: a local page to draw grids of samples (classes by name, sampler, steps,
guidance and its interval, seed, images per class), with their timing, the PNG, and the sample_dit.py command that
draws the same grid.

    opendit serve --ckpt outputs/demo/000-DiT-N-2 --device cpu        # then open http://127.0.0.1:7860/
    opendit serve --ckpt hf://OWNER/NAME --port 0                     # a free port (printed)

The model is loaded once; requests are drawn one at a time, in order. The page listens on 127.0.0.1 (this machine
only) unless --host says otherwise. Ctrl-C stops it.
"""

from __future__ import annotations

import sys

from ..config import GridConfig, ServeConfig
from .flags import add_settings, checking_parser, parse_config
from .program import ArgumentParser, run_main


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="A local web page to sample a DiT checkpoint.")
    add_settings(p, ServeConfig)
    return p


def main(argv=None) -> int:
    from ..serve.app import serve

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_main(lambda _: serve(parse_config(ServeConfig, parser, argv, section="sample")[0],
                                    checking_parser(GridConfig)), None)


if __name__ == "__main__":
    sys.exit(main())

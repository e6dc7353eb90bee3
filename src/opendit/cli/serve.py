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

from ..config import ServeConfig
from ..distributed import pick_device
from ..errors import UserError
from ..parallelize import ModelOptions
from ..precision import Precision
from ..sampling.compiled import check_fast_flags
from ..sampling.grid import parse_labels
from ..sampling.load import load_for_sampling, sampler_settings
from .flags import add_settings, parse_config
from .program import ArgumentParser, run_main


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="A local web page to sample a DiT checkpoint.")
    add_settings(p, ServeConfig)
    return p


def first_settings(cfg: ServeConfig, loaded) -> dict:
    """The page's settings at first: the flags given, else the 20-evaluation sampler of the training grids, the
    default classes (as many as --max_images allows) and guidance 4 (1 with guidance trained in)."""
    objective, s, g = loaded.objective, cfg.sampler, cfg.guidance
    quick = objective.quick_sampler
    sampler = s.sampler if s.sampler != "auto" else quick["sampler"]
    same = sampler == quick["sampler"]
    steps = s.num_sampling_steps or (quick["steps"] if same else objective.default_steps or 250)
    method = s.sampling_method or (quick.get("sampling_method") if same else None)
    classes = list(dict.fromkeys(parse_labels(None, loaded.num_classes)))
    per_class = min(cfg.serve.per_class, cfg.serve.max_images)
    classes = classes[:max(1, cfg.serve.max_images // per_class)]
    scale = g.cfg_scale if g.cfg_scale is not None else (1.0 if objective.guidance_trained_in else g.DEFAULT_SCALE)
    interval = [f"{v:g}" for v in g.cfg_interval] if g.cfg_interval is not None else None
    return dict(sampler=sampler, steps=steps, sampling_method=method, seed=s.seed, cfg_scale=scale,
                cfg_interval=interval, classes=classes, per_class=per_class)


def serve(cfg: ServeConfig) -> int:
    from ..serve.app import Explorer, make_server, section_argv

    if cfg.guidance.cfg_interval_sigma is not None:
        raise UserError("--cfg_interval_sigma: the page sets the interval on the t axis; use --cfg_interval")
    machine = cfg.machine
    device = pick_device(machine.device, 0)
    precision = Precision(machine.mixed_precision, device)
    check_fast_flags(machine, cfg.cache, device)
    server = make_server(None, cfg.serve.host, cfg.serve.port)  # the port first: in use is said at once
    try:
        loaded = load_for_sampling(cfg.checkpoint, ModelOptions.from_config(machine), device, precision)
        sampler_settings(cfg, loaded)  # the flags checked against the checkpoint, as sample_dit.py does
        base = section_argv(cfg.checkpoint) + section_argv(cfg.cache) + section_argv(machine)
        first = first_settings(cfg, loaded)
        explorer = Explorer(loaded, base, first, device, precision, cfg.serve.max_images)
        explorer.config(explorer.command(dict(first, per_class=str(first["per_class"]))))  # the first page's check
        server.RequestHandlerClass.explorer = explorer
        host, port = server.server_address[:2]
        print(f"{loaded.name} from {loaded.source} ({loaded.objective_note}) on {device}: "
              f"http://{host}:{port}/ (Ctrl-C stops)", flush=True)
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_main(lambda _: serve(parse_config(ServeConfig, parser, argv, section="sample")[0]), None)


if __name__ == "__main__":
    sys.exit(main())

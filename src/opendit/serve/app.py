"""The sampling page's server: one model loaded once, one worker that draws the grids (requests wait in its queue),
and a small JSON API under a static page.

    GET  /              the page (page.html)
    GET  /api/info      the model, its classes by name, its samplers, the page's defaults and limits
    POST /api/generate  {"classes": [3, 7], "per_class": "2", "sampler": "dpm-solver++", "steps": "20",
                         "cfg_scale": "1.5", "cfg_interval": ["0", "0.7"] or null, "sampling_method": null,
                         "seed": "0"}
                        -> {"image": "data:image/png;base64,...", "seconds": ..., "queued_seconds": ..., "command": ...}
                        or, for a bad value, status 400 and {"error": "one line"}

A request becomes the command line of scripts/dit/sample_dit.py (the server's checkpoint and machine flags, then the
request's) and is parsed and checked by that program's own parser and settings: the page's grid is the one
``sample_dit.py`` writes for the command it shows, pixel for pixel (tests/test_serve_browser.py).
"""

from __future__ import annotations

import base64
import io
import json
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from ..config import GridConfig, ServeConfig
from ..config.fields import default_of, is_switch
from ..distributed import pick_device
from ..errors import UserError, reason
from ..parallelize import ModelOptions
from ..precision import Precision
from ..sampling.compiled import check_fast_flags
from ..sampling.generate import describe_settings
from ..sampling.grid import draw_grid, parse_labels
from ..sampling.load import load_for_sampling, sampler_settings

# flow samplers: the integration methods the page offers (the ODE's adaptive ones need torchdiffeq)
FLOW_METHODS = {"ode": ("euler", "heun", "dopri5"), "sde": ("Euler", "Heun")}
MAX_BODY = 1 << 20  # bytes of a request body


# the settings a page request gives (the server's own values of these are only the page's first values)
PAGE_SETTINGS = ("sampler", "num_sampling_steps", "seed", "sampling_method", "cfg_scale", "cfg_interval", "config")


def section_argv(section, skip: tuple[str, ...] = ("config",)) -> list[str]:
    """The flags that give a config section's non-default values (``--ckpt X``, a switch alone, a pair's values),
    but those named in ``skip``."""
    words = []
    for f in fields(section):
        value = getattr(section, f.name)
        if value == default_of(f) or f.name in skip:
            continue
        if is_switch(f):
            words.append(f"--{f.name}")
        elif isinstance(value, (list, tuple)):
            words += [f"--{f.name}", *(f"{v:g}" if isinstance(v, float) else str(v) for v in value)]
        else:
            words += [f"--{f.name}", f"{value:g}" if isinstance(value, float) else str(value)]
    return words


def _value(value, what: str) -> str:
    """A request value as one command-line word (a number or text; the program's parser checks it)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UserError(f"{what}: expected a number or text, got {json.dumps(value)}")
    word = value.strip() if isinstance(value, str) else (repr(value) if isinstance(value, float) else str(value))
    if word.startswith("-") and not _is_number(word):
        raise UserError(f"{what}: not a value: {word!r}")
    return word


def _is_number(word: str) -> bool:
    try:
        float(word)
        return True
    except ValueError:
        return False


@dataclass
class Result:
    png: bytes
    seconds: float
    queued_seconds: float
    command: list[str]  # sample_dit.py's arguments for the same grid (without --out)
    description: str


class Explorer:
    """A checkpoint loaded once (``loaded``: opendit.sampling.load.Loaded) and drawn from by one worker thread."""

    def __init__(self, loaded, base_argv: list[str], defaults: dict, device, precision, max_images: int, parse):
        """``parse(argv) -> GridConfig``: sample_dit.py's flags, a bad value raised as a UserError (the program's
        ``opendit.cli.flags.checking_parser(GridConfig)``)."""
        self.loaded, self.base_argv, self.defaults = loaded, list(base_argv), defaults
        self.device, self.precision, self.max_images, self.parse = device, precision, max_images, parse
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opendit-serve")  # the queue

    # -- what the page shows before a request
    def info(self) -> dict:
        objective = self.loaded.objective
        methods = {s: list(FLOW_METHODS[s]) for s in objective.samplers
                   if "sampling_method" in objective.options and s in FLOW_METHODS}
        return dict(model=self.loaded.name, source=self.loaded.source, objective=objective.name,
                    objective_note=self.loaded.objective_note, image_size=self.loaded.image_size,
                    class_names=[str(n) for n in self.loaded.class_names], samplers=list(objective.samplers),
                    methods=methods, min_steps=objective.min_steps, guidance_trained_in=objective.guidance_trained_in,
                    max_images=self.max_images, defaults=self.defaults)

    # -- a request
    def command(self, request: dict) -> list[str]:
        """sample_dit.py's arguments for ``request`` (checked: one UserError line for a bad value)."""
        if not isinstance(request, dict):
            raise UserError("the request must be a JSON object")
        classes = request.get("classes")
        if not isinstance(classes, list) or not classes:
            raise UserError("choose at least one class")
        n = self.loaded.num_classes
        if not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < n for c in classes):
            raise UserError(f"classes must be class indices in 0..{n - 1}")
        per_class = _value(request.get("per_class", 1), "images per class")
        try:
            count = int(per_class)
        except ValueError:
            raise UserError(f"images per class must be a whole number, got {per_class!r}") from None
        if count < 1:
            raise UserError(f"images per class must be at least 1, got {count}")
        if count * len(classes) > self.max_images:
            raise UserError(f"{count * len(classes):,} images asked for; this page draws at most {self.max_images} "
                            f"per request (serve --max_images)")
        words = ["--labels", ",".join(str(c) for c in classes for _ in range(count))]
        for key, flag, what in (("sampler", "--sampler", "sampler"), ("steps", "--num_sampling_steps", "steps"),
                                ("seed", "--seed", "seed"), ("cfg_scale", "--cfg_scale", "guidance scale"),
                                ("sampling_method", "--sampling_method", "method")):
            if (value := request.get(key)) is not None and value != "":
                words += [flag, _value(value, what)]
        if (interval := request.get("cfg_interval")) is not None:
            if not isinstance(interval, list) or len(interval) != 2:
                raise UserError("the guidance interval needs two numbers, LO and HI")
            words += ["--cfg_interval", *(_value(v, "guidance interval") for v in interval)]
        return self.base_argv + words

    def config(self, argv: list[str]) -> GridConfig:
        try:
            return self.parse(argv)
        except UserError as e:
            raise UserError(str(e).replace("argument --num_sampling_steps", "steps")
                            .replace("argument --cfg_scale", "guidance scale").replace("argument --seed", "seed")
                            .replace("argument --cfg_interval", "guidance interval")) from None

    def generate(self, request: dict) -> Result:
        """Check ``request`` here, then wait for the worker to draw it (requests are served one at a time)."""
        argv = self.command(request)
        cfg = self.config(argv)
        return self.worker.submit(self._draw, cfg, argv, time.perf_counter()).result()

    def _draw(self, cfg: GridConfig, argv: list[str], queued: float) -> Result:
        start = time.perf_counter()
        grid, _, settings = draw_grid(self.loaded, cfg, self.device, self.precision)
        seconds = time.perf_counter() - start
        buf = io.BytesIO()
        grid.save(buf, format="PNG")
        return Result(buf.getvalue(), seconds, start - queued, argv, describe_settings(settings))


def _page() -> bytes:
    return resources.files(__package__).joinpath("page.html").read_bytes()


class Handler(BaseHTTPRequestHandler):
    explorer: Explorer = None  # set by make_server
    server_version = "opendit-serve"

    def log_message(self, fmt, *args):  # quiet: the terminal shows one line per generated grid
        pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, _page(), "text/html; charset=utf-8")
        elif path == "/api/info":
            self._json(HTTPStatus.OK, self.explorer.info())
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {path}"})

    def do_POST(self):
        if self.path != "/api/generate":
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {self.path}"})
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_BODY:
                raise UserError("the request is empty or too large")
            try:
                request = json.loads(self.rfile.read(length))
            except (ValueError, UnicodeDecodeError):
                raise UserError("the request is not JSON") from None
            result = self.explorer.generate(request)
        except UserError as e:
            return self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        except Exception as e:  # a failure of the model or the machine: one line on the page and in the terminal
            print(f"error: generating failed ({type(e).__name__}: {reason(e)})", file=sys.stderr, flush=True)
            return self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"generating failed: {reason(e)}"})
        n = request["per_class"] if "per_class" in request else 1
        print(f"{len(request['classes'])} class(es) x {n}: {result.description}, {result.seconds:.2f} s",
              flush=True)
        self._json(HTTPStatus.OK, dict(
            image="data:image/png;base64," + base64.b64encode(result.png).decode(), seconds=result.seconds,
            queued_seconds=result.queued_seconds, description=result.description,
            command="python scripts/dit/sample_dit.py " + shlex.join(result.command) + " --out sample.png"))


def make_server(explorer: Explorer, host: str, port: int) -> ThreadingHTTPServer:
    """Bind ``host:port`` (0: a free port) or raise one UserError line (in use, not an address of this machine)."""
    handler = type("BoundHandler", (Handler,), {"explorer": explorer})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        if e.errno == 98 or "in use" in str(e):
            raise UserError(f"--port {port}: {host}:{port} is in use (another server?); pass another --port, or "
                            f"--port 0 for a free one") from None
        raise UserError(f"--host {host} --port {port}: cannot listen there ({reason(e)})") from None
    server.daemon_threads = True
    return server


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


def explorer_for(cfg: ServeConfig, parse, device, precision) -> Explorer:
    """The checkpoint of ``cfg`` loaded, its flags checked against it as sample_dit.py checks them, and the page's
    first request checked."""
    loaded = load_for_sampling(cfg.checkpoint, ModelOptions.from_config(cfg.machine), device, precision)
    sampler_settings(cfg, loaded)
    # every request: the checkpoint, cached steps, the machine, and the sampler and guidance options the page has no
    # control for (clip_denoised, a flow's timestep_shift / tolerances / SDE options, guidance_channels)
    base = [*section_argv(cfg.checkpoint), *section_argv(cfg.sampler, PAGE_SETTINGS),
            *section_argv(cfg.guidance, PAGE_SETTINGS), *section_argv(cfg.cache), *section_argv(cfg.machine)]
    first = first_settings(cfg, loaded)
    explorer = Explorer(loaded, base, first, device, precision, cfg.serve.max_images, parse)
    explorer.config(explorer.command(dict(first, per_class=str(first["per_class"]))))
    return explorer


def serve(cfg: ServeConfig, parse) -> int:
    """The body of ``opendit serve``: bind first (a port in use is said at once), load, serve until Ctrl-C."""
    if cfg.guidance.cfg_interval_sigma is not None:
        raise UserError("--cfg_interval_sigma: the page sets the interval on the t axis; use --cfg_interval")
    device = pick_device(cfg.machine.device, 0)
    precision = Precision(cfg.machine.mixed_precision, device)
    check_fast_flags(cfg.machine, cfg.cache, device)
    server = make_server(None, cfg.serve.host, cfg.serve.port)
    try:
        explorer = explorer_for(cfg, parse, device, precision)
        server.RequestHandlerClass.explorer = explorer
        host, port = server.server_address[:2]
        loaded = explorer.loaded
        print(f"{loaded.name} from {loaded.source} ({loaded.objective_note}) on {device}: "
              f"http://{host}:{port}/ (Ctrl-C stops)", flush=True)
        server.serve_forever()
    finally:
        server.server_close()
    return 0

"""DiTConfig: what a DiT is (architecture and block options), the one way a DiT is built.

    cfg = DiTConfig.from_name("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000)
    model = DiT(cfg)
    DiTConfig.from_state_dict(model.state_dict()) == cfg  # what the weights show (wo_pos_embed is not in them)
    DiTConfig.from_dict(cfg.to_dict())                    # config.json

Speed switches (attention backend, norm kernels, activation checkpointing, compile, sharding) are not part of it: they
do not change what the model computes and are applied from outside (``opendit.parallelize``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

BLOCK_OPTIONS = ("use_rmsnorm", "use_swiglu", "use_rope", "use_qknorm", "wo_shift", "wo_pos_embed")

# name: (depth, hidden_size, num_heads). S/B/L/XL are the published family; T (tiny, DeiT-Ti
# width) and N (nano) are extra small configs for CPU runs and tests; 1p0B and 1p6B are LightningDiT's larger sizes.
DIT_SIZES = {
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
    "T": (12, 192, 3),
    "N": (4, 128, 4),
    "1p0B": (24, 1536, 24),
    "1p6B": (28, 1792, 28),
}
DIT_NAMES = tuple(f"DiT-{s}/{p}" for s in ("XL", "L", "B", "S", "T", "N") for p in (1, 2, 4, 8))
# LightningDiT's registry names: the same structure (patch 1 or 2); as in that code, a name implies no block option
LIGHTNING_NAMES = tuple(f"LightningDiT-{s}/{p}" for s in ("XL", "L", "B", "1p0B", "1p6B") for p in (1, 2))
MODEL_NAMES = DIT_NAMES + LIGHTNING_NAMES
PUBLISHED_MODELS = tuple(f"DiT-{s}/{p}" for s in ("XL", "L", "B", "S") for p in (2, 4, 8))


def unknown_model(name: str) -> str:
    """The message for a model name that is not registered: the closest names first, then where the list is."""
    import difflib

    close = difflib.get_close_matches(name, list(MODEL_NAMES), n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return f"unknown model {name!r}; {hint}`opendit models` lists all {len(MODEL_NAMES)} (DiT-{{XL,L,B,S,T,N}}/{{1,2,4,8}}, " \
           f"LightningDiT-*)"


def model_config(name: str) -> dict:
    """depth, hidden_size, num_heads and patch_size of a registered config."""
    if name not in MODEL_NAMES:
        raise KeyError(unknown_model(name))
    size, p = name.split("-", 1)[1].split("/")
    depth, hidden, heads = DIT_SIZES[size]
    return {"depth": depth, "hidden_size": hidden, "num_heads": heads, "patch_size": int(p)}


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


def block_options_problem(options: dict, hidden_size: int, num_heads: int) -> str | None:
    """Why these block options cannot build a model of this width (one line, in the model's terms), or None."""
    if unknown := sorted(set(options) - set(BLOCK_OPTIONS)):
        return f"unknown block option {unknown[0]!r}; choose from {', '.join(BLOCK_OPTIONS)}"
    if options.get("wo_pos_embed") and not options.get("use_rope"):
        return "wo_pos_embed drops the absolute position embedding, the only position information without use_rope"
    head_dim = hidden_size // num_heads
    if options.get("use_rope") and head_dim % 4:
        return (f"use_rope rotates pairs of channels on two axes, so the head dimension must be divisible by 4; "
                f"{hidden_size} / {num_heads} heads = {head_dim}")
    return None


@dataclass(frozen=True)
class DiTConfig:
    """A DiT's architecture. Defaults: DiT-XL/2 at 256 px (a 32 x 32 latent grid, 4 channels, 1000 classes)."""

    input_size: tuple[int, int] = (32, 32)  # the input grid (H, W): latents or pixels
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True  # the output holds a variance half (the diffusion's learned variance)
    # block options of the LightningDiT lineage; all off: the published DiT
    use_rmsnorm: bool = False
    use_swiglu: bool = False
    use_rope: bool = False
    use_qknorm: bool = False
    wo_shift: bool = False
    wo_pos_embed: bool = False
    # MeanFlow: the network also takes the interval's end r (embedded as h = r - t by ``h_embedder``)
    mean_flow: bool = False

    def __post_init__(self):
        object.__setattr__(self, "input_size", _pair(self.input_size))
        for name in BLOCK_OPTIONS + ("learn_sigma", "mean_flow"):
            object.__setattr__(self, name, bool(getattr(self, name)))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden size {self.hidden_size} is not divisible by {self.num_heads} heads")
        if problem := block_options_problem(self.block_options, self.hidden_size, self.num_heads):
            raise ValueError(problem)

    # -- what it is
    @property
    def block_options(self) -> dict:
        return {k: getattr(self, k) for k in BLOCK_OPTIONS}

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.input_size[0] // self.patch_size, self.input_size[1] // self.patch_size)

    @property
    def num_tokens(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def name(self) -> str | None:
        """The registry name of this structure (DiT-XL/2, ...), or None."""
        for names in (DIT_NAMES, LIGHTNING_NAMES):
            for n in names:
                c = model_config(n)
                if (c["depth"], c["hidden_size"], c["num_heads"], c["patch_size"]) == \
                        (self.depth, self.hidden_size, self.num_heads, self.patch_size):
                    return n
        return None

    def replace(self, **changes) -> "DiTConfig":
        return dataclasses.replace(self, **changes)

    # -- from a registry name, a state dict, config.json
    @classmethod
    def from_name(cls, name: str, **kwargs) -> "DiTConfig":
        """A registered structure (depth, width, heads, patch) with the remaining fields from ``kwargs``."""
        c = model_config(name)
        return cls(depth=c["depth"], hidden_size=c["hidden_size"], num_heads=c["num_heads"],
                   patch_size=c["patch_size"], **kwargs)

    @classmethod
    def from_state_dict(cls, sd: dict, *, input_size=None, wo_pos_embed: bool = False,
                        num_heads: int | None = None) -> "DiTConfig":
        """The DiT a state dict describes. What the weights cannot show comes from the arguments: the input grid
        when it is not square (default: the square grid of the token count), ``wo_pos_embed``, and the number of heads
        of a width that no registered size has. Raises ValueError for anything that is not a DiT state dict."""
        d = config_from_state_dict(sd)
        heads = num_heads or d["num_heads"]
        if heads is None:
            raise ValueError(f"hidden size {d['hidden_size']} matches no registered size; give num_heads")
        if input_size is None:
            side = math.isqrt(d["num_tokens"])
            if side * side != d["num_tokens"]:
                raise ValueError(f"the state dict has {d['num_tokens']} tokens, not a square grid; give input_size")
            input_size = (side * d["patch_size"],) * 2
        return cls(input_size=input_size, patch_size=d["patch_size"], in_channels=d["in_channels"],
                   hidden_size=d["hidden_size"], depth=d["depth"], num_heads=heads, mlp_ratio=d["mlp_ratio"],
                   num_classes=d["num_classes"], learn_sigma=d["learn_sigma"], mean_flow=d["mean_flow"],
                   **dict(d["options"], wo_pos_embed=bool(wo_pos_embed)))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["input_size"] = list(self.input_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ----------------------------------------------------------------------------- what a state dict shows

def block_options_from_state_dict(sd: dict, hidden: int) -> dict:
    """The block options a state dict's keys and shapes show (``wo_pos_embed`` is not in the weights: False)."""
    mod = sd.get("blocks.0.adaLN_modulation.1.weight")
    return {"use_rmsnorm": "final_layer.norm_final.weight" in sd, "use_swiglu": "blocks.0.mlp.w12.weight" in sd,
            "use_rope": "feat_rope.freqs_cos" in sd, "use_qknorm": "blocks.0.attn.q_norm.weight" in sd,
            "wo_shift": mod is not None and mod.shape[0] == 4 * hidden, "wo_pos_embed": False}


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """The published SwiGLU width: 2/3 of the GELU MLP's, so the two have about the same parameters and FLOPs."""
    return int(2 / 3 * int(dim * mlp_ratio))


def _mlp_ratio(sd: dict, hidden: int, swiglu: bool) -> float:
    if not swiglu:
        return sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden if "blocks.0.mlp.fc1.weight" in sd else 4.0
    width = sd["blocks.0.mlp.w3.weight"].shape[1]  # int(2/3 * int(hidden * ratio)): try 4 (published), then others
    for ratio in (4.0, *(k / 8 for k in range(1, 129))):
        if swiglu_hidden(hidden, ratio) == width:
            return ratio
    raise ValueError(f"a SwiGLU width of {width} matches no MLP ratio for hidden size {hidden}")


def config_from_state_dict(sd: dict) -> dict:
    """What a DiT state dict determines: patch size, input channels, width, depth, classes, token count,
    learn_sigma, the block options, and the registry name and heads when one matches. Raises ValueError if it is not
    a DiT state dict."""
    need = ("pos_embed", "x_embedder.proj.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"not a DiT state dict (no {missing[0]})")
    hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
    depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    out = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    options = block_options_from_state_dict(sd, int(hidden))
    cfg = {
        "patch_size": int(patch), "in_channels": int(in_channels), "hidden_size": int(hidden), "depth": depth,
        "num_classes": int(sd["y_embedder.embedding_table.weight"].shape[0]) - 1,  # the last row is the null class
        "num_tokens": int(sd["pos_embed"].shape[1]), "learn_sigma": out == 2 * in_channels,
        "mlp_ratio": _mlp_ratio(sd, int(hidden), options["use_swiglu"]) if depth else 4.0, "options": options,
        "mean_flow": "h_embedder.mlp.0.weight" in sd,
    }
    cfg["name"] = next((n for names in (DIT_NAMES, LIGHTNING_NAMES) for n in names
                        if (model_config(n)["depth"], model_config(n)["hidden_size"], model_config(n)["patch_size"])
                        == (depth, hidden, patch)), None)
    heads = {h: nh for d, h, nh in DIT_SIZES.values()}
    cfg["num_heads"] = heads.get(int(hidden))
    return cfg

"""DiT weights in other layouts: diffusers' DiTTransformer2DModel (both ways), safetensors, published bare .pt.

diffusers' DiTTransformer2DModel keeps one copy of the timestep and label embedders per block (all equal after a
conversion) and computes the timestep frequencies as exp(-ln(10000) k / 127) where the DiT release uses k / 128; the
exported config sets norm_eps to the release's 1e-6, so the only numerical difference is that frequency convention
(``model.t_embedder.freq_shift = 1`` reproduces diffusers exactly).
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from .atomic import atomic_path
from .errors import UserError
from .models import config_from_state_dict, sincos_2d
from .checkpoint import load_state_dict_file, load_weights

DIFFUSERS_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
FORMATS = ("pt", "safetensors", "diffusers")


# ----------------------------------------------------------------------------- key maps

def _block_map(i: int) -> list[tuple[str, str]]:
    """(ours, diffusers) names inside block i, except qkv (split in three)."""
    d = f"transformer_blocks.{i}"
    pairs = [(f"blocks.{i}.adaLN_modulation.1", f"{d}.norm1.linear"), (f"blocks.{i}.attn.proj", f"{d}.attn1.to_out.0"),
             (f"blocks.{i}.mlp.fc1", f"{d}.ff.net.0.proj"), (f"blocks.{i}.mlp.fc2", f"{d}.ff.net.2")]
    return [(f"{a}.{w}", f"{b}.{w}") for a, b in pairs for w in ("weight", "bias")]


EMBEDDERS = [("t_embedder.mlp.0", "timestep_embedder.linear_1"), ("t_embedder.mlp.2", "timestep_embedder.linear_2")]
TOP = [("x_embedder.proj", "pos_embed.proj"), ("final_layer.adaLN_modulation.1", "proj_out_1"),
       ("final_layer.linear", "proj_out_2")]


def to_diffusers(sd: dict, depth: int) -> dict:
    out = {}
    for a, b in TOP:
        for w in ("weight", "bias"):
            out[f"{b}.{w}"] = sd[f"{a}.{w}"]
    for i in range(depth):
        emb = f"transformer_blocks.{i}.norm1.emb"
        for a, b in EMBEDDERS:
            for w in ("weight", "bias"):
                out[f"{emb}.{b}.{w}"] = sd[f"{a}.{w}"]
        out[f"{emb}.class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
        for a, b in _block_map(i):
            out[b] = sd[a]
        for w in ("weight", "bias"):
            q, k, v = sd[f"blocks.{i}.attn.qkv.{w}"].chunk(3, dim=0)
            for name, t in zip("qkv", (q, k, v)):
                out[f"transformer_blocks.{i}.attn1.to_{name}.{w}"] = t.clone()
    return out


def from_diffusers(dsd: dict, depth: int) -> dict:
    sd = {}
    for a, b in TOP:
        for w in ("weight", "bias"):
            sd[f"{a}.{w}"] = dsd[f"{b}.{w}"]
    emb0 = "transformer_blocks.0.norm1.emb"
    shared = [(f"{a}.{w}", f"{b}.{w}") for a, b in EMBEDDERS for w in ("weight", "bias")]
    shared.append(("y_embedder.embedding_table.weight", "class_embedder.embedding_table.weight"))
    for ours, theirs in shared:
        sd[ours] = dsd[f"{emb0}.{theirs}"]
        for i in range(1, depth):
            if not torch.equal(dsd[f"transformer_blocks.{i}.norm1.emb.{theirs}"], sd[ours]):
                raise UserError(f"block {i} of the diffusers model has its own {theirs} (trained separately per block): "
                                f"the DiT layout has one shared embedder, so this model cannot be converted exactly")
    for i in range(depth):
        for a, b in _block_map(i):
            sd[a] = dsd[b]
        for w in ("weight", "bias"):
            sd[f"blocks.{i}.attn.qkv.{w}"] = torch.cat([dsd[f"transformer_blocks.{i}.attn1.to_{n}.{w}"] for n in "qkv"])
    return sd


# ----------------------------------------------------------------------------- reading

def _is_diffusers_dir(path: str) -> bool:
    cfg = os.path.join(path, "config.json")
    if not (os.path.isdir(path) and os.path.isfile(cfg)):
        return False
    try:
        with open(cfg) as f:
            return json.load(f).get("_class_name") in DIFFUSERS_CLASSES
    except (OSError, ValueError):
        return False


def read_diffusers(path: str) -> tuple[dict, dict]:
    """(our state dict, the diffusers config) of a DiTTransformer2DModel folder; no diffusers import needed."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("norm_type", "ada_norm_zero") != "ada_norm_zero" or not cfg.get("patch_size"):
        raise UserError(f"{path}: a diffusers transformer that is not a DiT (norm_type {cfg.get('norm_type')!r})")
    files = [os.path.join(path, f"diffusion_pytorch_model.{ext}") for ext in ("safetensors", "bin")]
    weights = next((f for f in files if os.path.isfile(f)), None)
    if weights is None:
        raise UserError(f"{path}: no diffusion_pytorch_model.safetensors (sharded diffusers weights are not supported)")
    dsd = load_state_dict_file(weights)  # safetensors, or a weights_only .bin
    depth = cfg["num_layers"]
    try:
        sd = from_diffusers(dsd, depth)
    except KeyError as e:
        raise UserError(f"{path}: the weights miss {e} for a {depth}-layer DiT") from None
    # the frozen sin-cos position table: diffusers recomputes it, the DiT layout stores it
    side = cfg["sample_size"] // cfg["patch_size"]
    hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    sd["pos_embed"] = _pos_embed(hidden, side)
    return sd, cfg


def _pos_embed(hidden: int, side: int) -> torch.Tensor:
    return torch.from_numpy(sincos_2d(hidden, (side, side))).float().unsqueeze(0)


def read_any(path: str, use_model_weights: bool) -> tuple[dict, str]:
    if _is_diffusers_dir(path):
        sd, _ = read_diffusers(path)
        return sd, f"diffusers folder {path}"
    sd, what, _ = load_weights(path, use_model_weights)
    return sd, what


# ----------------------------------------------------------------------------- writing

def diffusers_config(sd: dict, num_heads: int | None) -> tuple[dict, int]:
    try:
        c = config_from_state_dict(sd)
    except ValueError as e:
        raise UserError(f"the source is {e}") from None
    if used := [k for k, on in c["options"].items() if on]:
        raise UserError(f"diffusers' DiTTransformer2DModel has no {', '.join(used)}: a model with the LightningDiT block "
                        f"options converts to .pt or .safetensors only")
    heads = num_heads or c["num_heads"]
    if not heads:
        raise UserError(f"cannot tell the number of attention heads of a width-{c['hidden_size']} DiT; pass --num_heads")
    side = int(round(c["num_tokens"] ** 0.5))
    if side * side != c["num_tokens"]:
        raise UserError("the diffusers DiT needs a square token grid")
    out_channels = c["in_channels"] * (2 if c["learn_sigma"] else 1)
    cfg = {"_class_name": "DiTTransformer2DModel", "num_attention_heads": heads,
           "attention_head_dim": c["hidden_size"] // heads, "in_channels": c["in_channels"], "out_channels": out_channels,
           "num_layers": c["depth"], "sample_size": side * c["patch_size"], "patch_size": c["patch_size"],
           "num_embeds_ada_norm": c["num_classes"], "norm_eps": 1e-6, "norm_num_groups": 32,
           "activation_fn": "gelu-approximate", "norm_type": "ada_norm_zero", "norm_elementwise_affine": False,
           "attention_bias": True, "upcast_attention": False, "dropout": 0.0}
    return cfg, c["depth"]


def write(sd: dict, dst: str, fmt: str, num_heads: int | None) -> None:
    """Write ``sd`` to ``dst`` in ``fmt`` (pt, safetensors, diffusers) atomically: a hidden temporary beside it is
    renamed over it once complete (an existing folder is replaced only then)."""
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise UserError(f"{dst}: the folder {parent} does not exist")
    with atomic_path(dst, tmp=os.path.join(parent, f".tmp-{os.path.basename(dst.rstrip(os.sep))}-{os.getpid()}")) as tmp:
        if fmt == "pt":
            torch.save({k: v.contiguous() for k, v in sd.items()}, tmp)
        elif fmt == "safetensors":
            save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata={"format": "pt", "layout": "DiT"})
        else:
            save_diffusers(sd, tmp, num_heads)


def save_diffusers(sd: dict, folder: str, num_heads: int | None) -> None:
    cfg, depth = diffusers_config(sd, num_heads)
    dsd = {k: v.contiguous() for k, v in to_diffusers(sd, depth).items()}
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError:
        raise UserError("writing a diffusers folder needs diffusers (pip install diffusers)") from None
    model = DiTTransformer2DModel(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    missing, unexpected = model.load_state_dict(dsd, strict=False)
    if missing or unexpected:
        raise UserError(f"diffusers' DiTTransformer2DModel expects other weights ({len(missing)} missing, e.g. "
                        f"{(missing or ['-'])[0]}; {len(unexpected)} unexpected)")
    model.save_pretrained(folder, safe_serialization=True)


def target_format(dst: str, flag: str | None) -> str:
    if flag:
        return flag
    low = dst.lower()
    if low.endswith((".pt", ".pth", ".bin")):
        return "pt"
    if low.endswith(".safetensors"):
        return "safetensors"
    if low.endswith(os.sep) or os.path.isdir(dst) or "." not in os.path.basename(low):
        return "diffusers"
    raise UserError(f"cannot tell the format of {dst} from its name; pass --format {'|'.join(FORMATS)}")


def convert(src: str, dst: str, *, format: str | None = None, model_weights: bool = False,
            num_heads: int | None = None, force: bool = False) -> int:
    """The body of ``opendit convert``: ``src`` (any weights) -> ``dst`` in ``format`` (default: what its name
    implies)."""
    fmt = target_format(dst, format)
    if os.path.exists(dst) and not force:
        raise UserError(f"{dst} exists; pass --force to replace it")
    if os.path.exists(dst) and os.path.isdir(dst) != (fmt == "diffusers"):
        raise UserError(f"{dst} exists and is {'a folder' if os.path.isdir(dst) else 'a file'}; "
                        f"a {fmt} target cannot replace it")
    sd, what = read_any(src, model_weights)
    try:
        cfg = config_from_state_dict(sd)
    except ValueError as e:
        raise UserError(f"{src}: {e}") from None
    write(sd, dst, fmt, num_heads)
    n = sum(v.numel() for v in sd.values())
    print(f"{what} -> {dst} ({fmt}): {cfg['name'] or 'DiT'}, {len(sd)} tensors, {n:,} elements")
    return 0

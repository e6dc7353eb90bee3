"""Which objective a checkpoint was trained with: its run's config.json, else ``--objective``, else what its weights
show, else what the published checkpoint of that name was trained as."""

from __future__ import annotations

import torch

from ..errors import UserError


def trained_kind(sd: dict, cfg: dict) -> str | None:
    """What a learn_sigma DiT state dict was trained as, from its weights: the diffusion trains the variance half of
    the final layer (its vb loss), a flow never touches it (it keeps its zero initialization exactly: no gradient, and
    AdamW's decay keeps zero at zero), as in the published SiT checkpoints. None without a variance half or for an
    untrained model. ``cfg``: ``config_from_state_dict(sd)``."""
    if not cfg["learn_sigma"]:
        return None
    c = cfg["in_channels"]
    w, b = sd["final_layer.linear.weight"], sd["final_layer.linear.bias"]
    if w.shape[0] % (2 * c):
        return None
    variance = torch.arange(w.shape[0]) % (2 * c) >= c  # rows are (p, q, channel), the channel fastest
    if not (torch.any(w[~variance] != 0) or torch.any(b[~variance] != 0)):
        return None  # an untrained model (the final layer starts at zero): nothing to tell
    untouched = not torch.any(w[variance] != 0) and not torch.any(b[variance] != 0)
    return "flow" if untouched else "diffusion"


def resolve_objective(flag: str, flow_flags: dict, run_cfg: dict | None, sd: dict, cfg: dict, source: str,
                      published: str | None = None):
    """(the objective to sample with, how it was decided). ``flag``: --objective (auto, diffusion, flow);
    ``flow_flags``: the given --path_type / --prediction / --sample_eps (None: not given). A flag that contradicts the
    run or the weights is a one-line error (a flow sampled as a diffusion gives noise)."""
    from . import FLOW_SETTINGS, build_objective

    flag = flag or "auto"
    weights = "meanflow" if cfg.get("mean_flow") else trained_kind(sd, cfg)  # only MeanFlow's DiT takes two times
    if run_cfg is not None:
        kind, why = run_cfg.get("objective") or "diffusion", "the run's config.json"
        settings = dict(run_cfg, objective=kind)
        for key in ("path_type", "prediction"):  # what the model was trained to predict is the run's
            ours = flow_flags.get(key)
            if ours is not None and kind == "flow" and ours != run_cfg.get(key):
                raise UserError(f"--{key} {ours}: {source} was trained with --{key} {run_cfg.get(key)}; drop it")
        if flow_flags.get("sample_eps") is not None:  # a sampling margin: ours may differ (e.g. for SBDM)
            settings["sample_eps"] = flow_flags["sample_eps"]
    else:
        if flag != "auto":
            kind, why = flag, "--objective"
        elif weights is None and published is not None:  # weights that cannot tell (no variance half): the record
            kind, why = published, "the published checkpoint's record"
        else:
            kind, why = weights or "diffusion", "the weights"
        settings = {"objective": kind, **{k: flow_flags.get(k) for k in FLOW_SETTINGS}}
    if flag != "auto" and flag != kind:
        raise UserError(f"--objective {flag}: {source} was trained as {kind} ({why}); drop --objective or use "
                        f"--objective {kind}")
    if weights is not None and weights != kind:
        how = {"meanflow": "it takes a second time (h_embedder)", "flow": "its variance channels are untouched",
               "diffusion": "its variance channels are trained"}[weights]
        raise UserError(f"{source} looks {weights}-trained ({how}), but {why} says {kind}; sample it with "
                        f"--objective {weights}")
    if weights is None and published is not None and published != kind:
        raise UserError(f"{source} is a published {published} checkpoint, but {why} says {kind}; sample it with "
                        f"--objective {published}")
    if kind != "flow" and run_cfg is None and any(flow_flags.get(k) is not None for k in FLOW_SETTINGS):
        raise UserError(f"--path_type / --prediction / --sample_eps describe a flow; {source} is sampled as {kind}")
    return build_objective(settings), f"objective {kind} (from {why})"

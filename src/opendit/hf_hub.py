"""Checkpoints on the Hugging Face Hub: ``--ckpt hf://OWNER/NAME[@REVISION][/FILE]``.

The repository (or one FILE of it) is fetched with ``huggingface_hub`` (the optional extra ``opendit[hub]``) into its
own cache (``$HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``) and loaded from there like a local path: an
exported run (``opendit export``: model.safetensors + config.json) loads exactly like the run it came from. Offline
mode is honoured (``HF_HUB_OFFLINE=1`` or ``OPENDIT_OFFLINE`` set: the cache only). Whatever cannot be had is one line.
"""

from __future__ import annotations

import os
import re

from .errors import UserError, reason

PREFIX = "hf://"
# [datasets/ | spaces/] (the repository type, as huggingface_hub's HfFileSystem writes it; a model without), OWNER/NAME,
# then @REVISION (a branch, tag or commit; no "/"), then /FILE (a path inside the repository)
_URI = re.compile(r"^hf://(?:(?P<type>datasets|spaces)/)?(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[^/]+))?"
                  r"(?:/(?P<file>.+))?$")
REPO_TYPES = {None: None, "datasets": "dataset", "spaces": "space"}


def is_hf_uri(path: str) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def parse_hf_uri(uri: str, flag: str = "--ckpt") -> tuple[str, str | None, str | None, str | None]:
    """(repo id, revision or None, file or None, repository type: None for a model, "dataset", "space") of
    ``hf://[datasets/]OWNER/NAME[@REVISION][/FILE]``."""
    m = _URI.match(uri)
    if not m:
        raise UserError(f"{flag} {uri}: not a Hub address; write hf://OWNER/NAME, hf://OWNER/NAME@REVISION or "
                        f"hf://OWNER/NAME/FILE (hf://datasets/OWNER/NAME/FILE for a data set)")
    return m["repo"], m["rev"], m["file"], REPO_TYPES[m["type"]]


def offline() -> bool:
    """OPENDIT_OFFLINE set (any value, as for every other download of the project), or HF_HUB_OFFLINE on in
    huggingface_hub's own spelling (1 / ON / YES / TRUE)."""
    hf = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return bool(os.environ.get("OPENDIT_OFFLINE")) or hf


def resolve_hf(uri: str, flag: str = "--ckpt") -> str:
    """The local path of ``uri`` in the Hub cache (a folder, or the file named), downloading it unless offline.
    ``flag``: how the user gave it, for the one-line error."""
    repo, revision, file, repo_type = parse_hf_uri(uri, flag)
    try:
        import huggingface_hub as hub
    except ImportError:
        raise UserError(f"{flag} {uri}: reading from the Hub needs huggingface_hub (pip install 'opendit[hub]')"
                        ) from None
    local_only = offline()
    # read now: huggingface_hub reads these once, at its import
    kw = dict(revision=revision, repo_type=repo_type, local_files_only=local_only,
              cache_dir=os.environ.get("HF_HUB_CACHE") or None, endpoint=os.environ.get("HF_ENDPOINT") or None)
    try:
        return hub.hf_hub_download(repo, file, **kw) if file else hub.snapshot_download(repo, **kw)
    except Exception as e:  # not cached offline, no network, unknown repo / revision / file, no access
        where = "is not in the Hub cache and offline mode is on" if local_only else "cannot be fetched"
        raise UserError(f"{flag} {uri}: {where} ({reason(e)})") from None


def local_path(path: str | None, flag: str) -> str | None:
    """``path`` itself, or for an hf:// address its copy in the Hub cache (fetched unless offline)."""
    return resolve_hf(path, flag) if is_hf_uri(path) else path

"""Hugging Face Hub ids (ORG/NAME[@REVISION]) resolved to a snapshot directory in the HF cache, as transformers
and `hf download` lay it out. Each process resolves on its own machine: a Ray node or a standalone worker
finds the model in its own cache."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from gkd_async.errors import GKDError

# ORG/NAME with an optional @REVISION (a branch, tag or commit), as the Hub spells repository ids.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")


class HubError(GKDError):
    """A Hub id is neither in the HF cache nor downloadable."""


def hf_hub_cache() -> Path:
    """The HF cache's hub directory, read from the environment at each call (as huggingface_hub reads it at
    import): $HF_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub or ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_snapshot(spec: str, repo_type: Literal["model", "dataset"]) -> Path:
    """The local snapshot of `spec` (ORG/NAME[@REVISION]): from the HF cache when it is there, else downloaded
    into it (unless HF_HUB_OFFLINE is set)."""
    from huggingface_hub import snapshot_download

    repo_id, _, revision = spec.partition("@")
    cache = hf_hub_cache()
    problem = ""
    for local_only in (True, False):
        if not local_only and hub_offline():
            problem = "HF_HUB_OFFLINE is set, so nothing is downloaded"
            break
        try:
            return Path(
                snapshot_download(
                    repo_id,
                    repo_type=repo_type,
                    revision=revision or None,
                    cache_dir=cache,
                    local_files_only=local_only,
                )
            )
        except Exception as exc:  # huggingface_hub raises many kinds: not cached, no network, no such repo
            problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    what = (
        f"revision {revision!r} of the Hub {repo_type} {repo_id!r}" if revision else f"the Hub {repo_type} {repo_id!r}"
    )
    download = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    download += " --repo-type dataset" if repo_type == "dataset" else ""
    raise HubError(
        f"{what} is not in the HF cache at {cache} and could not be downloaded ({problem}). On a machine with "
        f"network run `{download}` (with HF_HOME pointing at this cache), or give a local path."
    )

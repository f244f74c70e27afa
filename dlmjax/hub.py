"""Where checkpoints come from: local directories, the Hugging Face hub, and our cache.

A name is a local directory if one exists at that path; then the name of a model shipped
in the package (`dlmjax.models`: tiny-llada, tiny-ar); otherwise a hub id of the form
`owner/name`, downloaded with huggingface_hub (or found in its local cache). Offline, a
missing download fails with a message that says what to fetch and where to put it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re

from dlmjax.errors import DlmjaxError

# Files a conversion needs from a hub repository: weights, config, tokenizer, chat template.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_root() -> pathlib.Path:
    """Converted checkpoints live here: $DLMJAX_CACHE, else ~/.cache/dlmjax."""
    return pathlib.Path(os.environ.get("DLMJAX_CACHE") or pathlib.Path.home() / ".cache" / "dlmjax")


def looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "/", "~"))


def resolve(name_or_path: str | os.PathLike) -> pathlib.Path:
    """A local directory for `name_or_path`: a directory, an embedded model's name
    ("tiny-llada", "tiny-ar"), or a hub id (downloaded if needed)."""
    path = pathlib.Path(name_or_path).expanduser()
    if path.is_dir():
        return path.resolve()
    from dlmjax import models

    embedded = models.path(str(name_or_path))
    if embedded is not None:
        return embedded
    if path.exists():
        raise DlmjaxError(f"{path} is a file, not a checkpoint directory; pass the directory that holds config.json")
    name = str(name_or_path)
    if not looks_like_hub_id(name):
        raise DlmjaxError(f"no checkpoint directory at {path}; check the path, or pass a hub id such as GSAI-ML/LLaDA-8B-Instruct")
    return download(name)


def download(repo_id: str) -> pathlib.Path:
    try:
        import huggingface_hub
        from huggingface_hub.errors import RepositoryNotFoundError
    except ImportError:  # pragma: no cover - a declared dependency
        raise DlmjaxError("huggingface_hub is not installed; pip install huggingface_hub to download checkpoints") from None
    try:
        return pathlib.Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except Exception:
        pass  # not in the local hub cache: try the network below
    try:
        return pathlib.Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except RepositoryNotFoundError:
        raise DlmjaxError(
            f"no local directory '{repo_id}' and no hub repository of that name; check the spelling or the path"
        ) from None
    except Exception as e:
        raise DlmjaxError(
            f"cannot download '{repo_id}' from the Hugging Face hub ({type(e).__name__}); on a machine with internet run "
            f"`hf download {repo_id} --local-dir DIR`, copy DIR here and pass its path instead of the hub id"
        ) from None


def fingerprint(src: pathlib.Path, extra: dict | None = None) -> str:
    """A key for a converted copy of `src`: its path, and the name, size and mtime of every file."""
    h = hashlib.sha256(str(src.resolve()).encode())
    for f in sorted(p for p in src.iterdir() if p.is_file()):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(json.dumps(extra or {}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def cached_conversion_dir(src: pathlib.Path, extra: dict | None = None) -> pathlib.Path:
    slug = re.sub(r"[^\w.-]+", "-", src.name).strip("-") or "model"
    return cache_root() / f"{slug}-{fingerprint(src, extra)}"

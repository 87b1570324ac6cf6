"""Hugging Face hub ids as checkpoint inputs (``extract org/base org/tuned --revision R``), through the optional
``huggingface_hub`` (``pip install 'lowrank-tools[hub]'``).

A string is a hub id only when it is not an existing path and has the ``org/name`` shape. It resolves to the
snapshot folder of the local cache first (``HF_HUB_CACHE``, or ``HF_HOME/hub``, read when called); only when the
cache lacks it, and ``HF_HUB_OFFLINE`` is not set, are the weights (safetensors, else ``.bin``) and the JSON/text
files beside them downloaded. Every failure is one line naming the id, the revision and the fix.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import CheckpointNotFound, MissingExtra

__all__ = ["is_hub_id", "hub_cache_dir", "hub_offline", "resolve_input", "resolve_inputs"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_SIDE_FILES = ["*.json", "*.txt", "*.model"]  # configs, tokenizers
_TRUE = {"1", "ON", "YES", "TRUE"}


def is_hub_id(spec: str | os.PathLike) -> bool:
    """``org/name`` that is not an existing path (``..`` and ``--`` parts excluded, as the hub does)."""
    text = os.fspath(spec)
    return (bool(_HUB_ID.match(text)) and ".." not in text and "--" not in text
            and not text.endswith(".") and not Path(text).exists())


def hub_cache_dir() -> Path | None:
    """``HF_HUB_CACHE``, else ``HF_HOME/hub``, else None (huggingface_hub's default), read at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return None


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or the older ``TRANSFORMERS_OFFLINE``) is set to a true value."""
    return any(os.environ.get(v, "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _require_hub():
    try:
        import huggingface_hub
    except ImportError:
        raise MissingExtra("hub ids (org/name) need huggingface_hub, which is not installed: pip install "
                           "'lowrank-tools[hub]' (or give a local path)") from None
    return huggingface_hub


def _what(repo: str, revision: str | None) -> str:
    return f"hub id {repo}" + (f" (revision {revision})" if revision else "")


def _download_patterns(hub, repo: str, revision: str | None, cache: Path | None) -> list[str]:
    """The weights to fetch: ``*.safetensors`` when the repo has any, else torch ``*.bin``; plus configs."""
    files = hub.HfApi().list_repo_files(repo, revision=revision)
    weights = "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin"
    return [weights, *_SIDE_FILES]


def _download(hub, repo: str, revision: str | None, cache: Path | None) -> Path:
    errors = hub.errors
    try:
        patterns = _download_patterns(hub, repo, revision, cache)
        return Path(hub.snapshot_download(repo, revision=revision, cache_dir=cache, allow_patterns=patterns))
    except errors.GatedRepoError:
        raise CheckpointNotFound(f"{_what(repo, revision)} is gated: accept its licence on huggingface.co and log in "
                                 f"(hf auth login), or give a local path") from None
    except errors.RepositoryNotFoundError:
        raise CheckpointNotFound(f"{_what(repo, revision)} is neither a local path nor a hub repository (or it is "
                                 f"private: log in with hf auth login): check the spelling") from None
    except errors.RevisionNotFoundError:
        raise CheckpointNotFound(f"{_what(repo, revision)}: no such revision on the hub: check --revision") from None
    except (OSError, ValueError) as exc:  # connection, disk, incomplete snapshot
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointNotFound(f"{_what(repo, revision)} is not in the local cache and could not be downloaded "
                                 f"({first}): check the network, or download it first (hf download {repo})") from None


def resolve_input(spec: str | os.PathLike, *, revision: str | None = None) -> Path:
    """The local path of a checkpoint input: ``spec`` itself unless it is a hub id, else its cached (or freshly
    downloaded) snapshot folder. Raises :class:`MissingExtra` without huggingface_hub and
    :class:`CheckpointNotFound` (one line) for an id that cannot be had."""
    if not is_hub_id(spec):
        return Path(spec)
    repo = os.fspath(spec)
    hub = _require_hub()
    cache = hub_cache_dir()
    try:
        return Path(hub.snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=True))
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError), or cached partly
        if hub_offline():
            where = cache or "the default hub cache"
            raise CheckpointNotFound(f"{repo} is not a local path, and as {_what(repo, revision)} it is not in the "
                                     f"local cache ({where}) while HF_HUB_OFFLINE is set: download it first (hf "
                                     f"download {repo}), unset HF_HUB_OFFLINE, or check the path") from None
    return _download(hub, repo, revision, cache)


def resolve_inputs(*specs, revision: str | None = None) -> list[Path]:
    """:func:`resolve_input` of each spec, with the same revision."""
    return [resolve_input(s, revision=revision) for s in specs]

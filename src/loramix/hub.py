"""Finding files in a local folder or a Hugging Face hub repository, through one code path.

A string that looks like a local path is never sent to the hub: a typo in a folder name must fail at once, naming
the folder, rather than after a minute of network retries (and without leaking the path to the network).
"""

from __future__ import annotations

import os


def looks_like_path(source: str) -> bool:
    """True for strings meant as local paths: absolute, starting with ./, ../ or ~, or whose parent folder exists.
    A hub id "owner/repo" is none of these (unless a local folder named "owner" exists)."""
    if os.path.isabs(source) or source.startswith(("./", "../", "~", ".\\", "..\\")) or source in (".", ".."):
        return True
    parent = os.path.dirname(source.rstrip("/"))
    return bool(parent) and os.path.isdir(parent)


def check_local(source: str, *, what: str) -> str:
    """`source` with ~ expanded; a FileNotFoundError naming it when it looks like a local path that is missing."""
    path = os.path.expanduser(source)
    if looks_like_path(source) and not os.path.exists(path):
        raise FileNotFoundError(f"{what}: {source!r} does not exist (a local path, so not looked up on the hub)")
    return path


def resolve_file(source: str, filename: str, *, what: str) -> str | None:
    """Path of `filename` inside `source` (a local folder or a hub id), or None if it is not there.

    A hub id is "owner/repo" optionally followed by a subfolder ("owner/repo/sub/folder"). A missing local path
    raises FileNotFoundError; network failures and unknown repositories raise an OSError; both name `what` and
    `source`.
    """
    source = check_local(source, what=what)
    if os.path.isdir(source):
        path = os.path.join(source, filename)
        return path if os.path.isfile(path) else None
    if os.path.exists(source):
        raise OSError(f"{what}: {source!r} is a file, expected a folder or a hub id")
    parts = source.strip("/").split("/")
    if len(parts) < 2 or any(p in ("", ".", "..") for p in parts):
        raise OSError(f"{what}: {source!r} is neither a local folder nor a hub id of the form owner/repo[/subfolder]")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:]) or None
    try:
        return hf_hub_download(repo_id, filename, subfolder=subfolder)
    except EntryNotFoundError:
        return None
    except Exception as err:  # offline, unknown repo, auth: all reported the same way
        raise OSError(f"{what}: {source!r} is not a local folder and could not be fetched from the hub "
                      f"({type(err).__name__}: {err})") from err

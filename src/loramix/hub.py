"""Finding files in a local folder or a Hugging Face hub repository, through one code path."""

from __future__ import annotations

import os


def resolve_file(source: str, filename: str, *, what: str) -> str | None:
    """Path of `filename` inside `source` (a local folder or a hub id), or None if it is not there.

    A hub id is "owner/repo" optionally followed by a subfolder ("owner/repo/sub/folder"). Network failures and
    unknown repositories raise an OSError that names `what` and `source`.
    """
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

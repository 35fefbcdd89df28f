"""Finding files in a local folder or a Hugging Face hub repository, through one code path.

A string that looks like a local path is never sent to the hub: a typo in a folder name must fail at once, naming
the folder, rather than after a minute of network retries (and without leaking the path to the network). Before
the first hub download of a process the hub is asked once, with a short timeout, whether it answers; when it does
not, what is needed comes from the local cache only, and a miss is one line saying the hub is unreachable, rather
than a minute and a half of retries and an error that blames the wrong file.
"""

from __future__ import annotations

import os
from typing import Callable, TypeVar

PROBE_TIMEOUT_S = 3.0  # how long the one connectivity probe of a process waits for the hub
T = TypeVar("T")
_probed: dict[str, str | None] = {}  # endpoint -> None when it answered, else why it did not


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


def local_id(name: str) -> str:
    """The id to record for a base or a model: an existing local path made absolute (so the record works from
    any folder), anything else (a hub id) as it is."""
    path = os.path.expanduser(name)
    return os.path.abspath(path) if os.path.exists(path) else name


def recorded_path(recorded: str, folder: str) -> str:
    """A base id as a checkpoint in `folder` records it. Absolute paths and hub ids stay as they are. Older
    versions recorded a relative path as it was typed, relative to wherever they ran: it is taken from the
    current folder when it exists there, else from the checkpoint's folder or the nearest folder above it where
    it exists (a demo's `out/base` beside `out/xlora`)."""
    path = os.path.expanduser(recorded)
    if os.path.isabs(path) or os.path.exists(path) or not os.path.isdir(folder):
        return local_id(recorded)
    here = os.path.abspath(folder)
    while True:
        candidate = os.path.join(here, path)
        if os.path.exists(candidate):
            return os.path.normpath(candidate)
        parent = os.path.dirname(here)
        if parent == here:
            return recorded
        here = parent


def hub_unreachable() -> str | None:
    """None when the hub answers (any HTTP status will do), else why it does not. Asked once per process and
    endpoint, waiting at most PROBE_TIMEOUT_S; in offline mode (HF_HUB_OFFLINE=1) not asked."""
    from huggingface_hub import constants, get_session, is_offline_mode

    if is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    endpoint = constants.ENDPOINT
    if endpoint not in _probed:
        try:
            get_session().head(endpoint, timeout=PROBE_TIMEOUT_S)
            _probed[endpoint] = None
        except Exception as err:  # refused, timed out, no route, DNS, TLS: the hub is not there for us
            reason = (str(err).strip().splitlines() or [""])[0][:160]
            _probed[endpoint] = f"{type(err).__name__}: {reason}" if reason else type(err).__name__
    return _probed[endpoint]


class HubUnreachableError(OSError):
    """A hub id was needed, the hub did not answer, and the local cache does not hold it."""


def unreachable_error(source: str, reason: str, *, what: str) -> HubUnreachableError:
    from huggingface_hub import constants

    expected = os.path.abspath(os.path.expanduser(source))
    return HubUnreachableError(f"{what}: {source!r} is not a local folder ({expected} does not exist) and the "
                               f"Hugging Face hub at {constants.ENDPOINT} is unreachable ({reason}), nor is it in "
                               f"the local cache; pass a local folder instead (or connect and retry)")


def from_hub(load: Callable[[bool], T], source: str, *, what: str) -> T:
    """`load(cache_only)` for a hub id: from the hub when it answers, else from the local cache only, a miss
    raising one OSError that says the hub is unreachable. Either way a failure names `source` and the local
    folder it is not (a relative path typed in the wrong folder looks like a hub id)."""
    reason = hub_unreachable()
    try:
        return load(reason is not None)
    except OSError as err:  # transformers' and huggingface_hub's errors for missing files and repositories
        if reason is not None:
            raise unreachable_error(source, reason, what=what) from err
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise OSError(f"{what}: {source!r} is not a local folder ({os.path.abspath(os.path.expanduser(source))} "
                      f"does not exist) and could not be loaded from the hub ({type(err).__name__}: {first})") from err


def resolve_file(source: str, filename: str, *, what: str) -> str | None:
    """Path of `filename` inside `source` (a local folder or a hub id), or None if it is not there.

    A hub id is "owner/repo" optionally followed by a subfolder ("owner/repo/sub/folder"). A missing local path
    raises FileNotFoundError; an unreachable hub, network failures and unknown repositories raise an OSError;
    each names `what` and `source`.
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
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:]) or None
    reason = hub_unreachable()
    try:
        return hf_hub_download(repo_id, filename, subfolder=subfolder, local_files_only=reason is not None)
    except RemoteEntryNotFoundError:  # the repository has no such file
        return None
    except LocalEntryNotFoundError as err:  # not cached, and the hub did not answer
        raise unreachable_error(source, reason or "no answer", what=what) from err
    except Exception as err:  # unknown repo, auth, a failure mid-download: all reported the same way
        raise OSError(f"{what}: {source!r} is not a local folder ({os.path.abspath(source)} does not exist) and "
                      f"could not be fetched from the hub ({type(err).__name__}: {err})") from err


# ---- publishing ---------------------------------------------------------------------------------------------------
# left out of an upload: temporaries of an interrupted write (".name.XXXXXXXX"), hidden files and the training
# checkpoints of a run's output folder (optimizer states; the final model sits beside them)
PUSH_IGNORE = [".*", "**/.*", "checkpoint-*/**", "checkpoint-*"]


def push_folder(folder: str, repo_id: str, *, private: bool | None = None, token: str | None = None,
                commit_message: str | None = None, endpoint: str | None = None) -> str:
    """Upload the files of `folder` to the hub model repository `repo_id` ("owner/name"; "name" alone goes under
    the token's own account), creating it when missing, in one call of huggingface_hub's `HfApi.upload_folder`;
    returns the commit's URL. Hidden files and `checkpoint-*` folders stay behind (PUSH_IGNORE). `token`: None
    for huggingface_hub's own (HF_TOKEN or `hf auth login`); `endpoint`: None for its default (HF_ENDPOINT).
    A failure is one OSError naming the repository and the hub."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not os.path.isdir(os.path.expanduser(folder)):
        raise FileNotFoundError(f"push: {folder!r} is not a folder")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"repo_id: {repo_id!r} is not a hub repository id ({err})") from None
    api = HfApi(endpoint=endpoint, token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=os.path.expanduser(folder), repo_id=url.repo_id, repo_type="model",
                                 commit_message=commit_message or "Upload with loramix", ignore_patterns=PUSH_IGNORE)
    except Exception as err:  # HTTP errors, refused connections, bad credentials: one line naming where
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise OSError(f"push: {repo_id!r} to {api.endpoint}: {type(err).__name__}: {reason}") from err
    return info.commit_url


def local_references(folder: str, records: dict[str, str]) -> list[str]:
    """The local paths that the JSON files of a saved folder record as its base model, where `records` maps a
    file name to the key to read (an X-LoRA's config and its `base_model_id`, an adapter's config and its
    `base_model_name_or_path`), in the folder and its subfolders: what whoever downloads it will not have."""
    import json

    found = []
    for root, dirs, files in os.walk(os.path.expanduser(folder)):
        dirs[:] = [d for d in dirs if not d.startswith(".") and not d.startswith("checkpoint-")]
        for name, key in records.items():
            if name in files:
                try:
                    with open(os.path.join(root, name), encoding="utf-8") as f:
                        value = json.load(f).get(key)
                except (OSError, ValueError, AttributeError):
                    continue
                if isinstance(value, str) and value and looks_like_path(value) and value not in found:
                    found.append(value)
    return found

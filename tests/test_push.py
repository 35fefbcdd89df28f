"""Publishing on the hub: `XLoraModel.push_to_hub` and `loramix push`, through huggingface_hub's real client
(`HfApi.create_repo`, `HfApi.upload_folder`) against a stand-in hub on a loopback port, and back through the same
code path that loads any hub id (`hf_hub_download`)."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import pytest
import torch
from helpers import make_experts, tiny_base, tiny_tokenizer

from loramix import XLoraConfig, XLoraModel
from loramix.cli import main


class StandInHub(BaseHTTPRequestHandler):
    """The few hub routes that huggingface_hub's upload and download call: create a repo, the "preupload" question
    (every file is answered "regular", so its bytes come inline in the commit), the commit, and `resolve` (HEAD and
    GET of one file). `repos` maps "owner/name" -> {path: bytes}; `commits` lists (repo, summary)."""

    repos: dict[str, dict[str, bytes]] = {}
    commits: list[tuple[str, str]] = []
    validated: list[dict] = []  # the metadata of each README.md that the upload asked to validate

    def log_message(self, *args) -> None:  # quiet
        pass
        pass

    def _reply(self, status: int, body: dict | list | bytes | None = None, headers: dict | None = None) -> None:
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else (body or b"")
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_POST(self) -> None:
        path, endpoint = urlparse(self.path).path, f"http://{self.headers['Host']}"
        if path == "/api/repos/create":
            body = json.loads(self._body())
            repo = f"{body.get('organization') or 'me'}/{body['name']}"
            exists = repo in self.repos
            self.repos.setdefault(repo, {})
            return self._reply(409 if exists else 200, {"url": f"{endpoint}/{repo}"})
        if path == "/api/validate-yaml":  # the card's metadata, checked before the upload: parsed as the hub would
            from huggingface_hub import ModelCard

            self.validated.append(ModelCard(json.loads(self._body())["content"]).data.to_dict())
            return self._reply(200, {"errors": [], "warnings": []})
        parts = path.split("/")  # /api/models/<owner>/<name>/(preupload|commit)/<revision>
        repo = "/".join(parts[3:5])
        if parts[:3] != ["", "api", "models"] or repo not in self.repos:
            return self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        if parts[5] == "preupload":
            files = json.loads(self._body())["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]})
        if parts[5] == "commit":
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            for line in lines:
                if line["key"] == "file":
                    self.repos[repo][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            self.commits.append((repo, lines[0]["value"]["summary"]))
            oid = hashlib.sha1(repr(sorted(self.repos[repo])).encode()).hexdigest()
            return self._reply(200, {"commitUrl": f"{endpoint}/{repo}/commit/{oid}", "commitOid": oid})
        self._reply(404, {"error": "no such route"})

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        parts = unquote(urlparse(self.path).path).split("/")  # /<owner>/<name>/resolve/<revision>/<file path>
        if parts[1:3] == ["api", "models"]:  # what transformers asks before loading a tokenizer: info, a listing
            return self._api_get(parts[3:])
        if len(parts) < 6 or parts[3] != "resolve":
            return self._reply(200, b"stand-in hub")  # the connectivity probe
        repo, filename = "/".join(parts[1:3]), "/".join(parts[5:])
        files = self.repos.get(repo)
        if files is None:
            return self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        if filename not in files:
            return self._reply(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
        data = files[filename]
        commit = hashlib.sha1(repr(sorted(files)).encode()).hexdigest()
        self._reply(200, data, {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": commit})

    def _api_get(self, parts: list[str]) -> None:
        files = self.repos.get("/".join(parts[:2]))
        if files is None:
            return self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        commit = hashlib.sha1(repr(sorted(files)).encode()).hexdigest()
        if len(parts) == 2 or parts[2] == "revision":  # model_info
            return self._reply(200, {"id": "/".join(parts[:2]), "sha": commit, "private": False,
                                     "siblings": [{"rfilename": name} for name in sorted(files)]})
        folder = "/".join(parts[4:])  # tree/<revision>/<folder>: the entries directly inside it
        prefix = folder + "/" if folder else ""
        inside = sorted({prefix + name[len(prefix):].split("/")[0] for name in files if name.startswith(prefix)})
        if not inside:
            return self._reply(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
        self._reply(200, [{"type": "file" if p in files else "directory", "path": p, "oid": commit,
                           "size": len(files.get(p, b""))} for p in inside])


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The stand-in hub on a loopback port the OS picks, as huggingface_hub's endpoint (and a fresh cache)."""
    from huggingface_hub import constants, hf_api

    from loramix import hub as loramix_hub

    StandInHub.repos, StandInHub.commits, StandInHub.validated = {}, [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandInHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    # the shared clients took their endpoint when first made: huggingface_hub's module-level one, and transformers'
    # (5.x lists a repository's chat templates through it; made by whichever earlier test loaded a tokenizer)
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    from transformers.utils import hub as transformers_hub

    if hasattr(transformers_hub, "hf_api"):
        monkeypatch.setattr(transformers_hub.hf_api(), "endpoint", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_stand_in")  # never sent anywhere but the loopback stand-in
    monkeypatch.setattr(loramix_hub, "_probed", {})
    try:
        yield endpoint
    finally:
        server.shutdown()
        server.server_close()


def _xlora(tmp_path):
    base = tiny_base("llama")
    base.save_pretrained(str(tmp_path / "base"))
    adapters = make_experts(base, "llama", tmp_path, n=2)
    return XLoraModel.from_base(str(tmp_path / "base"), XLoraConfig(adapters=adapters, xlora_depth=2,
                                                                     xlora_size=8, layerwise_scalings=True))


def _folder_files(folder) -> dict[str, bytes]:
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder).replace(os.sep, "/")] = open(path, "rb").read()
    return found


def test_push_to_hub_uploads_the_saved_folder_and_it_loads_back_by_hub_id(hub, tmp_path, ids):
    model = _xlora(tmp_path)
    with torch.no_grad():
        model.classifier.last.bias.add_(torch.linspace(-1, 1, model.classifier.last.bias.numel()))
    with pytest.warns(UserWarning, match="the base model is the local path"):
        url = model.push_to_hub("someone/tiny-xlora", tokenizer=tiny_tokenizer())
    assert url.startswith(f"{hub}/someone/tiny-xlora/commit/")
    model.save_pretrained(str(tmp_path / "saved"), tokenizer=tiny_tokenizer(), repo_id="someone/tiny-xlora")
    pushed = StandInHub.repos["someone/tiny-xlora"]
    assert pushed == _folder_files(tmp_path / "saved")  # byte for byte what save_pretrained writes
    assert {"xlora_config.json", "xlora_classifier.safetensors", "README.md", "tokenizer.json",
            "expert_0/adapter_model.safetensors", "expert_1/adapter_config.json"} <= set(pushed)
    assert StandInHub.commits == [("someone/tiny-xlora", "Upload with loramix")]
    assert [v["library_name"] for v in StandInHub.validated] == ["loramix"]
    # a hub id goes through hf_hub_download, the same path as any published X-LoRA
    again = XLoraModel.from_pretrained("someone/tiny-xlora", tokenizer="someone/tiny-xlora")
    assert os.path.isdir(os.path.join(str(tmp_path / "hf-cache"), "models--someone--tiny-xlora"))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
    assert again.tokenizer("abc")["input_ids"] == tiny_tokenizer()("abc")["input_ids"]


def test_push_verb_uploads_a_folder_without_checkpoints_or_temporaries(hub, tmp_path, capsys):
    folder = tmp_path / "expert"
    peft_model = copy.deepcopy(tiny_base("llama"))
    from peft import LoraConfig, get_peft_model

    get_peft_model(peft_model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(folder))
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "optimizer.safetensors").write_bytes(b"x")
    (folder / ".README.md.abcd1234").write_text("a killed write")
    assert main(["push", str(folder), "someone/expert", "--private"]) == 0
    assert sorted(StandInHub.repos["someone/expert"]) == ["README.md", "adapter_config.json",
                                                          "adapter_model.safetensors"]
    assert StandInHub.repos["someone/expert"]["adapter_model.safetensors"] == \
        (folder / "adapter_model.safetensors").read_bytes()
    assert f"{hub}/someone/expert/commit/" in capsys.readouterr().out
    # a second push to the same repository: create_repo's 409 is taken as "exists" and the files replaced
    (folder / "README.md").write_text("---\nlibrary_name: peft\n---\nnew card\n")
    assert main(["push", str(folder), "someone/expert"]) == 0
    assert StandInHub.repos["someone/expert"]["README.md"].endswith(b"new card\n")
    assert len(StandInHub.commits) == 2


def test_push_verb_warns_about_local_base_paths(hub, tmp_path, capsys):
    model = _xlora(tmp_path)
    model.save_pretrained(str(tmp_path / "xlora"))
    assert main(["push", str(tmp_path / "xlora"), "someone/x"]) == 0
    err = capsys.readouterr().err
    assert "local path" in err and str(tmp_path / "base") in err


def test_push_errors_name_the_folder_repo_and_hub(hub, tmp_path, capsys):
    assert main(["push", str(tmp_path / "missing"), "someone/x"]) == 2
    assert "missing" in capsys.readouterr().err
    (tmp_path / "f").mkdir()
    assert main(["push", str(tmp_path / "f"), "not a repo id!"]) == 2
    assert "not a hub repository id" in capsys.readouterr().err
    from loramix.hub import push_folder

    with pytest.raises(OSError, match="someone/x.*127.0.0.1:1"):
        push_folder(str(tmp_path / "f"), "someone/x", endpoint="http://127.0.0.1:1")  # nothing listens there

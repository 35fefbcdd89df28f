"""loading.py: base model, tokenizer and experts; local paths never reach the hub (the saved X-LoRA folder and its
bad files: test_checkpoint.py)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
from helpers import make_experts, tiny_base, tiny_tokenizer

from loramix import XLoraConfig, XLoraModel
from loramix.hub import looks_like_path
from loramix.loading import load_base, load_tokenizer


@pytest.fixture
def no_network(monkeypatch):
    """Every way a name could reach the hub raises; the list records the attempts."""
    import huggingface_hub
    from transformers import AutoModelForCausalLM, AutoTokenizer

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise AssertionError(f"sent to the hub: {args[:2]}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refuse)
    return attempts


@pytest.fixture
def saved(tmp_path):
    """A saved X-LoRA (depth 2, size 16) over a saved tiny base with a tokenizer."""
    base = tiny_base("llama")
    base.save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    adapters = make_experts(base, "llama", tmp_path, n=2)
    model = XLoraModel.from_base(str(tmp_path / "base"), XLoraConfig(adapters=adapters, xlora_depth=2, xlora_size=16))
    model.save_pretrained(str(tmp_path / "xlora"))
    return base, tmp_path / "xlora"


# ---- local paths never reach the hub ------------------------------------------------------------------------------
def test_what_looks_like_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for path in ("/abs/model", "./model", "../model", "~/model", "models/missing", "."):
        assert looks_like_path(path), path
    for hub_id in ("owner/repo", "owner/repo/sub/folder", "gpt2"):
        assert not looks_like_path(hub_id), hub_id


@pytest.mark.parametrize("name", ["missing", "./missing", "sub/missing"])
def test_missing_base_path_names_it_and_stays_local(tmp_path, monkeypatch, no_network, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    source = name if name != "missing" else str(tmp_path / "missing")
    config = XLoraConfig(adapters={"a": str(tmp_path / "a")})
    with pytest.raises(FileNotFoundError, match=rf"base model: '{source}' does not exist"):
        XLoraModel.from_base(source, config)
    with pytest.raises(FileNotFoundError, match=rf"tokenizer: '{source}' does not exist"):
        load_tokenizer(source)
    assert no_network == []


def test_missing_expert_folder_of_a_checkpoint_stays_local(saved, no_network):
    base, folder = saved
    shutil.rmtree(folder / "expert_1")
    with pytest.raises(FileNotFoundError, match=r"expert 'expert_1'.*expert_1' does not exist"):
        XLoraModel.from_pretrained(str(folder), base=copy.deepcopy(base))
    with pytest.raises(FileNotFoundError, match=r"X-LoRA checkpoint.*does not exist"):
        XLoraModel.from_pretrained(str(folder) + "-typo", base=copy.deepcopy(base))
    assert no_network == []


# ---- base model options -------------------------------------------------------------------------------------------
def test_placement_options_go_to_transformers(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = {}

    def record(path, **kwargs):
        seen.update(path=path, **kwargs)
        return tiny_base("llama")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", record)
    load_base(str(tmp_path), dtype=torch.bfloat16, device_map="auto", max_memory={0: "1GiB"},
              offload_folder=str(tmp_path / "off"))
    assert seen == dict(path=str(tmp_path), trust_remote_code=False, dtype=torch.bfloat16, device_map="auto",
                        max_memory={0: "1GiB"}, offload_folder=str(tmp_path / "off"))


def test_from_pretrained_forwards_placement_options(saved, monkeypatch):
    from transformers import AutoModelForCausalLM

    base, folder = saved
    seen = {}
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda path, **kw: seen.update(path=path, **kw) or copy.deepcopy(base))
    model = XLoraModel.from_pretrained(str(folder), device_map={"": "cpu"}, offload_folder="off")
    assert seen["path"] == str(folder.parent / "base") and seen["device_map"] == {"": "cpu"}
    assert seen["offload_folder"] == "off" and model.base_model_id == str(folder.parent / "base")


def test_quantization_is_plumbing_with_clear_errors(tmp_path, monkeypatch):
    import importlib.util

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes"
                        else real_find_spec(name, *a))
    with pytest.raises(ImportError, match="quantization: needs the bitsandbytes package"):
        load_base(str(tmp_path), quantization="4bit")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes"
                        else real_find_spec(name, *a))
    seen = {}
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda path, **kw: seen.update(kw) or tiny_base())
    load_base(str(tmp_path), quantization="8bit", device="cpu")
    assert seen["quantization_config"].load_in_8bit and seen["device_map"] == {"": "cpu"}
    mine = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    load_base(str(tmp_path), quantization=mine)
    assert seen["quantization_config"] is mine
    with pytest.raises(ValueError, match="quantization: got '3bit'"):
        load_base(str(tmp_path), quantization="3bit")
    with pytest.raises(ValueError, match="quantization: applies when the base model is loaded by name"):
        load_base(tiny_base(), quantization="4bit")
    with pytest.raises(ValueError, match="device_map: give either device or device_map"):
        load_base(str(tmp_path), device="cpu", device_map="auto")


def test_loaded_module_is_moved_to_dtype_and_records_its_name(saved):
    base, folder = saved
    model = XLoraModel.from_pretrained(str(folder), base=copy.deepcopy(base), dtype=torch.float64)
    assert model.dtype == torch.float64 and model.classifier.last.weight.dtype == torch.float64


# ---- tokenizer ----------------------------------------------------------------------------------------------------
def test_tokenizer_falls_back_in_order_and_takes_a_chat_template(saved, tmp_path):
    _, folder = saved
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}", encoding="utf-8")
    tokenizer = load_tokenizer(str(folder), str(tmp_path / "base"), chat_template_file=str(template))
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<user>hi"
    assert load_tokenizer(None, tokenizer) is tokenizer
    with pytest.raises(FileNotFoundError, match=rf"tokenizer: none could be loaded from '{folder}'"):
        load_tokenizer(str(folder))
    with pytest.raises(ValueError, match="tokenizer: nothing to load it from"):
        load_tokenizer(None)
    with pytest.raises(FileNotFoundError, match="chat template: .*nope.jinja' does not exist"):
        load_tokenizer(str(tmp_path / "base"), chat_template_file=str(tmp_path / "nope.jinja"))


# ---- a relative base is recorded by its absolute path; old relative records resolve beside the checkpoint ----------
@pytest.fixture
def offline(monkeypatch):
    """The hub out of reach (huggingface_hub's offline mode): a name sent there fails at once, from the cache."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def read_json(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def test_relative_base_is_recorded_absolute_and_loads_from_another_folder(tmp_path, monkeypatch, offline, capsys):
    """`--base demo/base` typed in one folder: the expert, the X-LoRA (and each of its experts) and the PEFT export
    record /.../demo/base, so `generate` from another folder loads that base, not a hub repository "demo/base"."""
    from helpers import write_jsonl

    from loramix.cli import main
    from loramix.interop.export import export

    monkeypatch.chdir(tmp_path)
    base = tiny_base("llama")
    base.save_pretrained("demo/base")
    tiny_tokenizer().save_pretrained("demo/base")
    expected = str(tmp_path / "demo" / "base")
    write_jsonl(tmp_path / "demo" / "data.jsonl", [{"prompt": "ab", "completion": " cd"}] * 4)
    assert main(["train-expert", "--base", "demo/base", "--data", "demo/data.jsonl", "--output", "demo/expert",
                 "--max-steps", "1", "--batch-size", "2", "--rank", "2", "--no-progress"]) == 0
    assert read_json("demo/expert/adapter_config.json")["base_model_name_or_path"] == expected
    adapters = {"trained": "demo/expert", **make_experts(base, "llama", tmp_path / "demo", 1)}
    model = XLoraModel.from_base("demo/base", XLoraConfig(adapters=adapters))
    model.save_pretrained("demo/xlora")
    export(model, "peft", "demo/peft")
    assert read_json("demo/xlora/xlora_config.json")["base_model_id"] == expected
    assert read_json("demo/xlora/trained/adapter_config.json")["base_model_name_or_path"] == expected
    assert read_json("demo/peft/adapter_config.json")["base_model_name_or_path"] == expected

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    again = XLoraModel.from_pretrained(str(tmp_path / "demo" / "xlora"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert again.base_model_id == expected and torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
    capsys.readouterr()
    argv = ["generate", "--model", str(tmp_path / "demo" / "xlora"), "--prompt", "ab", "--max-new-tokens", "3"]
    assert main(argv) == 0


def test_old_checkpoint_with_a_relative_base_resolves_beside_itself(saved, tmp_path, monkeypatch, offline):
    """Checkpoints written before recorded the base as typed, relative to where they ran: from another folder it
    is found from the checkpoint's folder upwards; a relative record found nowhere fails at once, in one line."""
    base, folder = saved  # tmp_path/xlora over tmp_path/base
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = XLoraModel.from_pretrained(str(folder), base=copy.deepcopy(base))(input_ids=ids).logits
    record = read_json(folder / "xlora_config.json")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    for recorded in (f"{tmp_path.name}/base", "base"):  # as typed in the checkpoint's grandparent, its parent
        (folder / "xlora_config.json").write_text(json.dumps({**record, "base_model_id": recorded}))
        model = XLoraModel.from_pretrained(str(folder))
        with torch.no_grad():
            assert model.base_model_id == str(tmp_path / "base") and torch.equal(model(input_ids=ids).logits, expected)
    (folder / "xlora_config.json").write_text(json.dumps({**record, "base_model_id": "gone/base"}))
    start = time.monotonic()
    with pytest.raises(OSError, match=r"base model: 'gone/base' is not a local folder \(.*/elsewhere/gone/base "
                                      r"does not exist\) and the Hugging Face hub at .* is unreachable .*pass a local "
                                      r"folder"):
        XLoraModel.from_pretrained(str(folder))
    assert time.monotonic() - start < 10


# ---- an unreachable hub: one line within seconds ------------------------------------------------------------------
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_hub_fails_fast_in_one_line(saved, tmp_path):
    """No network and HF_HUB_OFFLINE unset: a hub id (a checkpoint, a base, a tokenizer) used to cost 50-90 s of
    retries, then an error that blamed the tokenizer or a missing file. Now the hub is asked once, briefly."""
    from helpers import write_jsonl

    endpoint = f"http://127.0.0.1:{closed_port()}"
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf-home"), "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "ab", "completion": " cd"}] * 2)
    runs = [(["generate", "--model", "owner/xlora", "--prompt", "hi"], "X-LoRA checkpoint: 'owner/xlora'"),
            (["generate", "--model", str(saved[1]), "--base", "owner/base", "--prompt", "hi"],
             "base model: 'owner/base'"),
            (["train-expert", "--base", "owner/base", "--data", data, "--output", str(tmp_path / "o")],
             "tokenizer: 'owner/base'")]
    code = "import sys; from loramix.cli import main; sys.exit(main(sys.argv[1:]))"
    for argv, what in runs:
        start = time.monotonic()
        out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=180)
        elapsed = time.monotonic() - start
        line = out.stderr.strip().splitlines()[-1]
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert line.startswith(f"loramix {argv[0]}: {what} is not a local folder"), line
        assert f"the Hugging Face hub at {endpoint} is unreachable" in line and "pass a local folder" in line
        assert elapsed < 25, (argv, elapsed)


def test_relative_base_found_nowhere_names_the_folder_it_expected(saved, tmp_path):
    """A relative path typed in the wrong folder looks like a hub id: the hub (here a loopback server that knows
    no repository) says no, and the one line names the local folder that was expected."""
    import http.server
    import threading

    class NoRepositories(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.send_header("X-Error-Code", "RepoNotFound")
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoRepositories)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
               "HF_HOME": str(tmp_path / "hf-home"), "OMP_NUM_THREADS": "1"}
        env.pop("HF_HUB_OFFLINE", None)
        code = "import sys; from loramix.cli import main; sys.exit(main(sys.argv[1:]))"
        out = subprocess.run([sys.executable, "-c", code, "generate", "--model", str(saved[1]), "--base", "demo/base",
                              "--prompt", "hi"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    finally:
        server.shutdown()
        server.server_close()
    line = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert line.startswith(f"loramix generate: base model: 'demo/base' is not a local folder ({tmp_path}/demo/base "
                           f"does not exist) and could not be loaded from the hub"), line

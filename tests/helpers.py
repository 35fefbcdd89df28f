"""Builders the tests share (import them with `from helpers import ...`): tiny random models, PEFT experts, a
character-level tokenizer and small data files, all made on the spot with no network and no downloads."""

from __future__ import annotations

import contextlib
import copy

import torch
from peft import LoraConfig, get_peft_model

VOCAB = 97


def tiny_base(arch: str = "llama", seed: int = 0):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                           pad_token_id=0, bos_token_id=1, eos_token_id=2))
    else:
        raise ValueError(arch)
    return model.eval()


# (rank, alpha, target modules, extra LoraConfig fields): experts deliberately unlike each other
EXPERT_SPECS = {
    "llama": [
        (4, 8, ["q_proj", "v_proj"], {}),
        (8, 16, ["q_proj", "k_proj", "down_proj", "embed_tokens"], {"use_rslora": True}),
        (6, 4, ["o_proj", "gate_proj", "up_proj", "v_proj"],
         {"rank_pattern": {"up_proj": 2}, "alpha_pattern": {"o_proj": 12}}),
    ],
    "gpt2": [
        (4, 8, ["c_attn"], {}),
        (8, 16, ["c_attn", "c_fc", "c_proj"], {}),
        (2, 4, ["c_proj", "wte"], {"use_rslora": True}),
    ],
}
EXPERT_SPECS["mistral"] = EXPERT_SPECS["qwen2"] = EXPERT_SPECS["llama"]


def make_experts(base, arch: str, folder, n: int | None = None) -> dict[str, str]:
    """Save PEFT LoRA adapters with random (non-zero) A and B for `base`; returns name -> folder."""
    specs = EXPERT_SPECS[arch][: n or None]
    adapters = {}
    for i, (r, alpha, targets, extra) in enumerate(specs):
        torch.manual_seed(100 + i)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                              init_lora_weights=False, **extra))
        with torch.no_grad():  # make the updates large enough to move the logits visibly
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.mul_(3.0)
        path = folder / f"expert_{i}"
        model.save_pretrained(str(path))
        adapters[f"expert_{i}"] = str(path)
    return adapters


def peft_reference(base, adapters: dict[str, str], ours, **config):
    """PEFT's XLoraModel on a copy of `base` with the same experts and our classifier's weights."""
    from peft import XLoraConfig as PeftXLoraConfig

    base = copy.deepcopy(base)
    base.config.use_cache = False  # PEFT refuses the KV cache
    # PEFT's X-LoRA only works with experts named "0", "1", ... (it loads them under those names)
    peft_adapters = {str(i): path for i, path in enumerate(adapters.values())}
    model = get_peft_model(base, PeftXLoraConfig(task_type="CAUSAL_LM", hidden_size=base.config.hidden_size,
                                                  adapters=peft_adapters, **config))
    model.eval()
    linears = [m for m in model.base_model.internal_xlora_classifier.layers if isinstance(m, torch.nn.Linear)]
    mine = ours.classifier.hidden_linears() + [ours.classifier.last]
    assert len(linears) == len(mine)
    with torch.no_grad():
        for theirs, own in zip(linears, mine):
            theirs.weight.copy_(own.weight)
            theirs.bias.copy_(own.bias)
    return model


def tiny_tokenizer():
    """A character-level fast tokenizer over the tiny vocabulary (ids 0-2 special), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 32 + VOCAB - 3)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def save_tiny_model(folder, arch: str = "llama", seed: int = 0, hidden_size: int = 32) -> str:
    """A tiny random base model with the char-level tokenizer, saved as a Hugging Face folder."""
    base = tiny_base(arch, seed)
    if hidden_size != 32:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        cfg = base.config.to_dict()
        cfg.update(hidden_size=hidden_size, intermediate_size=2 * hidden_size)
        base = LlamaForCausalLM(LlamaConfig(**cfg))
    base.save_pretrained(str(folder))
    tiny_tokenizer().save_pretrained(str(folder))
    return str(folder)


def write_jsonl(path, rows) -> str:
    import json

    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def synthetic_task(name: str, n: int, seed: int) -> list[dict]:
    """Two tasks a tiny model tells apart: 'rev' reverses lowercase words, 'sum' adds digit strings."""
    import random

    rnd = random.Random(f"{name}-{seed}")
    rows = []
    for _ in range(n):
        if name == "rev":
            word = "".join(rnd.choice("abcdefgh") for _ in range(rnd.randint(3, 6)))
            rows.append({"prompt": f"r {word}=", "completion": word[::-1], "task": "rev"})
        else:
            a, b = rnd.randint(10, 99), rnd.randint(10, 99)
            rows.append({"prompt": f"s {a}+{b}=", "completion": str(a + b), "task": "sum"})
    return rows


def tiny_xlora(arch: str, folder, **config):
    """A tiny base, its PEFT experts saved under `folder`, and an XLoraModel on a copy of the base:
    (base, adapters, model)."""
    from loramix import XLoraConfig, XLoraModel

    base = tiny_base(arch)
    adapters = make_experts(base, arch, folder)
    model = XLoraModel.from_base(copy.deepcopy(base), XLoraConfig(adapters=adapters, **config))
    return base, adapters, model


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of 10 ids, rows 1 and 2 left-padded by 4 and 2: (ids, attention mask)."""
    torch.manual_seed(11)
    ids = torch.randint(3, 97, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, :2] = 0
    return ids.masked_fill(mask == 0, 0), mask


def recorded_training_calls(monkeypatch, argv_list) -> list:
    """Run `loramix` on each argv with the training entry points replaced by a recorder (and no path checks: the
    argv name files that are not there); their (args, kwargs), in order."""
    import loramix.cli
    import loramix.training.loop
    from loramix import TrainResult

    monkeypatch.setattr(loramix.cli, "check_paths", lambda args: None)
    calls = []
    for name in ("train_xlora", "train_expert"):
        monkeypatch.setattr(loramix.training.loop, name,
                            lambda *args, **kwargs: calls.append((args, kwargs)) or TrainResult("o", {}))
    for argv in argv_list:
        assert loramix.cli.main(argv) == 0
    return calls


# ---- the server in a thread (test_server*.py) ----------------------------------------------------------------

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}|{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def save_served_checkpoint(root) -> str:
    """A saved X-LoRA checkpoint (base saved under root/base, experts, the tokenizer with CHAT_TEMPLATE) as the
    server loads it: returns root/tiny-xlora."""
    from loramix import XLoraConfig, XLoraModel

    base = tiny_base("llama")
    base.save_pretrained(str(root / "base"))
    adapters = make_experts(base, "llama", root)
    model = XLoraModel.from_base(str(root / "base"), XLoraConfig(adapters=adapters, xlora_depth=2, xlora_size=16,
                                                               layerwise_scalings=True))
    model.save_pretrained(str(root / "tiny-xlora"))
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(root / "tiny-xlora"))
    return root / "tiny-xlora"


class LiveServer:
    """The server (uvicorn) in a thread on 127.0.0.1, on a port the OS chose (a socket bound before it starts)."""

    def __init__(self, state) -> None:
        import socket
        import threading
        import time

        from loramix.serving.app import make_server

        # IPPROTO_TCP named, so that asyncio turns Nagle off on accepted connections (else ~40 ms a response)
        listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        listening.bind(("127.0.0.1", 0))
        self.port = listening.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(state)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [listening]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_server(checkpoint, **settings):
    """Load `checkpoint` with these ServeSettings fields (log level "warning" unless given) and serve it:
    (state, LiveServer)."""
    from loramix.serving.app import load_state
    from loramix.serving.settings import ServeSettings

    state = load_state(ServeSettings(model=str(checkpoint), **{"log_level": "warning", **settings}))
    return state, LiveServer(state)


@contextlib.contextmanager
def serving(checkpoint, **settings):
    """`start_server` as a block: (state, LiveServer), both stopped on the way out."""
    state, server = start_server(checkpoint, **settings)
    try:
        yield state, server
    finally:
        server.stop()
        state.engine.shutdown()


def openai_client(server, **kw):
    """The official OpenAI client on a LiveServer, without retries."""
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


def post_json(server, path, body, **kw):
    """POST a body (a dict as JSON, or raw bytes/str as they are) to a LiveServer."""
    import json

    import httpx

    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"},
                      **{"timeout": 30, **kw})


def slow_down_engine(state, monkeypatch, seconds: float) -> None:
    """A slow model: every decode step of `state`'s engine (a `DecodeBatch.decode` on its model) takes `seconds`
    longer."""
    import time

    from loramix.engine.batch import DecodeBatch

    decode = DecodeBatch.decode

    def slow_decode(batch):
        if batch.model is state.engine.model:
            time.sleep(seconds)
        return decode(batch)

    monkeypatch.setattr(DecodeBatch, "decode", slow_decode)


def wait_until(condition, timeout: float) -> float | None:
    """Seconds until condition() holds, or None after timeout."""
    import time

    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if condition():
            return time.perf_counter() - start
        time.sleep(0.01)
    return None

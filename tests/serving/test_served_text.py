"""Served text through the real server, for a model whose tokenizer is SentencePiece-style (a Metaspace BPE built
here, offline): the text of a choice, its stream chunks joined and its log-probability token strings joined all
equal the reference decode(prompt + new)[len(decode(prompt)):] of the ids the model generates, leading space
included; `generate` with the tokenizer gives the same text."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import CHAT_TEMPLATE, VOCAB, make_experts, post_json, serving, tiny_base
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from loramix import XLoraConfig, XLoraModel

EOS = 2
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789=+-*/.,:!?"
PROMPTS = ["sum 60+7 =", "the cat", "a, b", "mix 9"]
MAX_TOKENS = 8


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """Mistral-style, filling the tiny model's vocabulary: `<unk>` 0, `<s>` 1 (added before a prompt), `</s>` 2,
    "▁" 3, characters, "▁"+character merges and "▁▁"."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\u2581": 3, **{c: 4 + i for i, c in enumerate(CHARS)}}
    vocab.update({"\u2581" + c: len(vocab) + i for i, c in enumerate(CHARS)})
    vocab["\u2581\u2581"] = len(vocab)
    assert len(vocab) == VOCAB
    merges = [("\u2581", c) for c in CHARS] + [("\u2581", "\u2581")]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("metaspace")
    base = tiny_base("llama")
    base.save_pretrained(str(root / "base"))
    model = XLoraModel.from_base(str(root / "base"), XLoraConfig(adapters=make_experts(base, "llama", root),
                                                                 xlora_depth=2, xlora_size=16))
    model.save_pretrained(str(root / "xlora"))
    metaspace_tokenizer().save_pretrained(str(root / "xlora"))
    return root / "xlora"


@pytest.fixture(scope="module")
def live(checkpoint):
    with serving(checkpoint) as live:
        yield live


@pytest.fixture(scope="module")
def reference(checkpoint):
    """prompt ids -> (new ids, EOS dropped; the reference text; whether the row ended with an EOS), greedy, from an
    independent copy of the model."""
    model, tok = XLoraModel.from_pretrained(str(checkpoint)), metaspace_tokenizer()

    def generated(prompt: list[int]) -> tuple[list[int], str, bool]:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, eos_token_id=EOS)[0]
        new = out[len(prompt):].tolist()
        ended = EOS in new
        new = new[:new.index(EOS)] if ended else new
        whole, before = (tok.decode(ids, skip_special_tokens=True) for ids in (prompt + new, prompt))
        assert whole.startswith(before)
        return new, whole[len(before):], ended
    return generated


def _complete(server, **body) -> dict:
    response = post_json(server, "/v1/completions", {"model": "xlora", "max_tokens": MAX_TOKENS, "temperature": 0,
                                                     **body})
    assert response.status_code == 200, response.text
    return response.json()


def _expected(reference, prompts: list[str]) -> list[tuple[list[int], str, bool]]:
    tok = metaspace_tokenizer()
    return [reference(tok(p)["input_ids"]) for p in prompts]


def test_served_text_and_token_strings_keep_the_leading_space(live, reference):
    _, server = live
    expected = _expected(reference, PROMPTS)
    assert any(text.startswith(" ") for _, text, _ in expected)  # the case of the bug is exercised
    out = _complete(server, prompt=PROMPTS, logprobs=2)
    for choice, (new, text, ended) in zip(out["choices"], expected):
        assert choice["text"] == text
        tokens = choice["logprobs"]["tokens"]
        assert len(tokens) == len(new) + ended
        assert "".join(tokens) == text + ("</s>" if ended else "")  # an EOS shows its name and adds no text
        assert choice["logprobs"]["text_offset"] == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


def test_stream_chunks_join_into_the_same_text(live, reference):
    _, server = live
    expected = _expected(reference, PROMPTS)
    response = post_json(server, "/v1/completions", {"model": "xlora", "prompt": PROMPTS, "max_tokens": MAX_TOKENS,
                                                     "temperature": 0, "stream": True, "logprobs": 1})
    texts, tokens = [""] * len(PROMPTS), [[] for _ in PROMPTS]
    for line in response.text.splitlines():
        if line.startswith("data: {"):
            choice = json.loads(line[len("data: "):])["choices"][0]
            texts[choice["index"]] += choice["text"]
            tokens[choice["index"]] += (choice["logprobs"] or {}).get("tokens", [])
    assert texts == [text for _, text, _ in expected]
    assert ["".join(t) for t in tokens] == [text + ("</s>" if ended else "") for _, text, ended in expected]


def test_echoed_prompt_and_stop_strings(live, reference):
    _, server = live
    prompt = PROMPTS[0]
    _, text, _ = _expected(reference, [prompt])[0]
    echoed = _complete(server, prompt=prompt, echo=True, logprobs=1, stop=["never-appears"])["choices"][0]
    assert echoed["text"] == prompt + text
    tokens = echoed["logprobs"]["tokens"]
    assert tokens[0] == "<s>" and "".join(tokens[1:]).startswith(prompt + text)
    stop = text[4:6]  # a stop string inside the text: the text ends before its first occurrence
    assert len(stop) == 2 and _complete(server, prompt=prompt, stop=[stop])["choices"][0]["text"] == \
        text[:text.find(stop)]


def test_chat_content_and_its_token_strings(live, reference):
    _, server = live
    tok = metaspace_tokenizer()
    messages = [{"role": "user", "content": "sum 60+7"}]
    prompt = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    new, text, ended = reference(prompt)
    response = post_json(server, "/v1/chat/completions", {"model": "xlora", "messages": messages, "temperature": 0,
                                                          "max_tokens": MAX_TOKENS, "logprobs": True})
    choice = response.json()["choices"][0]
    assert choice["message"]["content"] == text
    assert "".join(c["token"] for c in choice["logprobs"]["content"]) == text + ("</s>" if ended else "")


def test_generate_with_the_tokenizer_gives_the_same_text(checkpoint, reference):
    model, tok = XLoraModel.from_pretrained(str(checkpoint)), metaspace_tokenizer()
    expected = _expected(reference, PROMPTS)
    tok.padding_side, tok.pad_token = "left", "<unk>"
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    result = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=MAX_TOKENS, eos_token_id=EOS,
                            pad_token_id=0, tokenizer=tok, return_scalings=True)
    assert result.texts == [text for _, text, _ in expected]

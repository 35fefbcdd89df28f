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


# ---- stop strings: the matching cost (issue 21) --------------------------------------------------------------------
def _naive_row_text(pieces: list[str], stops: list[str]) -> tuple[list[str], bool]:
    """The text rule's stop strings by brute force over the whole text: after each piece, the text is cut before the
    earliest first occurrence of any stop string; otherwise everything but the longest tail that is a proper start
    of a stop string is handed out."""
    text, sent, handed = "", 0, []
    for piece in pieces:
        text += piece
        hits = [at for at in (text.find(s) for s in stops) if at >= 0]
        if hits:
            handed.append(text[sent:min(hits)])
            return handed, True
        held = max((k for s in stops for k in range(1, len(s)) if text[sent:].endswith(s[:k])), default=0)
        handed.append(text[sent:len(text) - held])
        sent = len(text) - held
    handed.append(text[sent:])
    return handed, False


def _char_tokenizer():
    from helpers import tiny_tokenizer

    return tiny_tokenizer()  # one character per token: each token's piece is its character


def test_stop_strings_match_the_brute_force_rule():
    """Random texts over a 3-letter alphabet against random stop strings (many partial matches and hold-backs):
    the handed-out pieces and the cut equal the brute-force rule's."""
    import random

    from loramix.engine.text import RowText, StopMatcher

    tok = _char_tokenizer()
    rng = random.Random(21)
    for _ in range(300):
        text = "".join(rng.choice("abc") for _ in range(rng.randrange(1, 40)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randrange(1, 8))) for _ in range(rng.randrange(1, 4))]
        row = RowText(tok, tok("x")["input_ids"], stops)
        handed = []
        for char in text:
            row.push(tok.convert_tokens_to_ids(char))
            handed.append(row.take(final=False))
            if row.ended:
                break
        handed.append(row.take(final=True))
        expected, stopped = _naive_row_text(list(text), stops)
        assert "".join(handed) == "".join(expected) and row.stopped == stopped, (text, stops)
        assert [p for p in handed if p] == [p for p in expected if p], (text, stops)
        # pieces of several characters: the first stop string is the one that starts first
        matcher = StopMatcher(stops)
        for start in range(0, len(text), 3):
            at = matcher.feed(text[start:start + 3])
            hits = [found for found in (text[:start + 3].find(s) for s in stops) if found >= 0]
            assert (None if at is None else start + at) == (min(hits) if hits else None), (text, stops)
            if at is not None:
                break


def test_matching_stop_strings_costs_at_most_two_steps_per_character_and_stop_string():
    """Issue 21: 16 stop strings of 60,000 characters, each starting like the generated text and leaving it at a
    different place (so a long tail is held back and given up again), took 0.48 s for 1,000 tokens (34 times the
    cost of short stop strings) with a search that rescanned the held-back text per stop string; the automaton takes
    at most 2 steps per new character and stop string, whatever their lengths."""
    import random

    from loramix.engine.text import RowText

    tok = _char_tokenizer()
    rng = random.Random(0)
    ids = [rng.randrange(3, 97) for _ in range(1000)]
    text = tok.decode(ids)
    for stops in ([text[:60 * (j + 1)] + "\x7f" * 60_000 for j in range(16)], ["\x7f" * 60_000] * 16, ["zz"] * 16):
        row = RowText(tok, tok("x")["input_ids"], stops)
        handed = []
        for token in ids:
            row.push(token)
            handed.append(row.take(final=False))
        assert "".join(handed) + row.take(final=True) == text and not row.stopped
        assert row.matcher.steps <= 2 * len(text) * len(stops)

"""The text rule (engine/text.py) against its reference, the decode of the whole sequence: for a prompt and new ids,
the text is decode(prompt + new)[len(decode(prompt)):] (special tokens skipped), streamed or whole, for a byte-level
BPE tokenizer and two SentencePiece-style ones (a Metaspace decoder; Llama-2's Replace/ByteFallback/Strip decoder),
all built here, offline."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from loramix.engine.params import SamplingParams
from loramix.engine.rows import RowState, finish_reason
from loramix.engine.text import RowText, TextDecoder, TokenTexts, until_eos
from loramix.tiny import byte_level_tokenizer

EOS = 2
TEXTS = ["sum 60+7 = 67", "a  b   c", " leading, and trailing ", "naïve café costs €5, ok?", "日本語 text 😀 end",
         "x\n\ny"]
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789=+.,!?"


def metaspace_tokenizer(legacy: bool) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE (`<unk>` 0, `<s>` 1, `</s>` 2, the 256 byte tokens, "▁", characters and
    "▁"+character merges) that adds `<s>`. `legacy`: Llama-2's normalizer and decoder (Replace, ByteFallback, Fuse,
    Strip one leading space), else a Metaspace pre-tokenizer and decoder (Mistral's)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}, "\u2581": 259}
    vocab.update({c: len(vocab) + i for i, c in enumerate(CHARS)})
    vocab.update({"\u2581" + c: len(vocab) + i for i, c in enumerate(CHARS)})
    tok = Tokenizer(models.BPE(vocab, [("\u2581", c) for c in CHARS], unk_token="<unk>", byte_fallback=True))
    if legacy:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="first")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


class ByteLevel:
    """loramix.tiny's byte-level tokenizer with every byte pair in its vocabulary, text encoded two bytes per token
    (so tokens start and end inside characters), as GPT-2's byte-level BPE does."""

    def __init__(self) -> None:
        self.tokenizer = byte_level_tokenizer(3 + 256 + 256 * 256)
        self.split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)

    def __call__(self, text: str) -> list[int]:
        chars = "".join(piece for piece, _ in self.split.pre_tokenize_str(text))  # one character per byte
        return [self.tokenizer.convert_tokens_to_ids(chars[i:i + 2]) for i in range(0, len(chars), 2)]


@pytest.fixture(scope="module", params=["byte-level", "metaspace", "llama-2"])
def coder(request):
    """(tokenizer, encode: text -> ids)."""
    if request.param == "byte-level":
        encode = ByteLevel()
        return encode.tokenizer, encode
    tok = metaspace_tokenizer(legacy=request.param == "llama-2")
    return tok, lambda text: tok(text)["input_ids"]


def decode(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=True)


def splits(tok, ids):
    """Every (prompt, new) split of ids whose prompt text is whole characters, with the reference text of new."""
    full = decode(tok, ids)
    for k in range(len(ids) + 1):
        prompt_text = decode(tok, ids[:k])
        if not prompt_text.endswith("\ufffd"):
            yield ids[:k], ids[k:], full[len(prompt_text):]


def test_deltas_join_into_the_text_of_the_whole_sequence(coder):
    tok, encode = coder
    for text in TEXTS:
        for prompt, new, reference in splits(tok, encode(text)):
            decoder = TextDecoder(tok, prompt)
            deltas = [decoder.push(t) for t in new]
            assert "".join(deltas) == reference, (text, len(prompt))
            assert not any("\ufffd" in d for d in deltas)  # a split character shows once whole, never as U+FFFD


def test_the_leading_space_of_new_text_is_kept():
    """The bug: decoding the new ids alone drops their first space with SentencePiece-style tokenizers."""
    tok = metaspace_tokenizer(legacy=False)
    prompt, new = tok("sum 60+7 =")["input_ids"], tok.convert_tokens_to_ids(["\u2581", "6", "7"])
    assert decode(tok, prompt + new) == "sum 60+7 = 67" and decode(tok, new) == "67"
    row = RowState.start(prompt, SamplingParams(), device="cpu", tokenizer=tok, keep_text=True)
    streamed = []
    for token in new:
        row.push(token)
        streamed.append(row.take_text(final=False))
    assert streamed == [" ", "6", "7"] and row.take_text(final=True) == ""
    strings = TokenTexts(tok, prompt)
    assert [strings.push(t) for t in new] == [" ", "6", "7"]


def test_a_character_split_over_tokens_shows_once_complete():
    encode = ByteLevel()
    tok, prompt = encode.tokenizer, encode("price: ")
    ids = encode("5€€")  # bytes 35 e2 82 ac e2 82 ac: tokens [35 e2] [82 ac] [e2 82] [ac]
    decoder = TextDecoder(tok, prompt)
    assert [decoder.push(t) for t in ids] == ["", "5€", "", "€"]
    row = RowText(tok, prompt)
    for token in ids[:-1]:  # the budget ends inside the second €: it never shows, as U+FFFD or otherwise
        row.push(token)
    assert row.take(final=False) == "5€" and row.take(final=True) == ""


@pytest.mark.parametrize("stop", [["= 6"], ["7", "ever"], [" 6"], ["not there"], ["0+", "60"]])
def test_streamed_text_is_cut_before_the_first_stop_string(coder, stop):
    tok, encode = coder
    ids = encode("sum 60+7 = 67 and more")
    n_prompt = len(encode("sum"))
    for prompt, new, reference in splits(tok, ids):
        if len(prompt) < n_prompt:
            continue
        hits = [at for at in (reference.find(s) for s in stop) if at >= 0]
        expected = reference[:min(hits, default=len(reference))]
        row = RowState.start(prompt, SamplingParams(stop=stop, max_new_tokens=len(new) + 1), device="cpu",
                             tokenizer=tok)
        sent, reason = "", None
        for token in new:
            row.push(token)
            reason = finish_reason(row)
            sent += row.take_text(final=reason is not None)
            assert expected.startswith(sent)  # nothing handed out is taken back
            if reason is not None:
                break
        sent += row.take_text(final=True)
        assert sent == expected, (len(prompt), stop)
        assert (reason == "stop") == bool(hits) == row.text.stopped


def test_a_tail_that_could_become_a_stop_string_waits():
    tok = metaspace_tokenizer(legacy=False)
    row = RowText(tok, tok("sum 60+7 =")["input_ids"], stop=["67", "6+"])
    pieces = []
    for token in tok.convert_tokens_to_ids(["\u2581", "6", "8"]):
        row.push(token)
        pieces.append(row.take(final=False))
    assert pieces == [" ", "", "68"] and not row.stopped
    row.push(tok.convert_tokens_to_ids("\u25816"))
    assert row.take(final=False) == " "  # "6" could still become "67" or "6+"
    row.push(tok.convert_tokens_to_ids("7"))
    assert row.stopped and row.take(final=False) == "" and row.take(final=True) == ""


def test_text_ends_at_the_first_eos(coder):
    tok, encode = coder
    prompt, new = encode("a question"), encode(" and its answer")[1:]
    row = RowText(tok, prompt, eos_token_ids=[EOS])
    for token in new[:3] + [EOS] + new[3:]:
        row.push(token)
    assert row.take(final=True) == decode(tok, prompt + new[:3])[len(decode(tok, prompt)):]
    assert until_eos(new[:3] + [EOS] + new[3:], [EOS]) == new[:3] and until_eos(new, [EOS]) == new


def test_token_strings_join_into_the_text(coder):
    tok, encode = coder
    special = set(tok.all_special_ids)
    for text in TEXTS:
        ids = encode(text)
        for prompt, new, reference in splits(tok, ids):  # (a prompt of no tokens: the echoed prompt's strings)
            strings = TokenTexts(tok, prompt)
            shown = [strings.push(t) for t in new]
            assert "".join(s for s, t in zip(shown, new) if t not in special) == reference, (text, len(prompt))
            assert all(s == tok.decode([t]) for s, t in zip(shown, new) if t in special)  # "<s>": its name


def test_alternatives_are_decoded_in_the_same_context(coder):
    tok, encode = coder
    ids = encode("sum 60+7 = 67")
    candidates = [encode(" 6")[-1], encode("x")[-1], EOS]
    for prompt, new, _ in splits(tok, ids):
        strings = TokenTexts(tok, prompt)
        for i, token in enumerate(new):
            context = prompt + new[:i]
            if not decode(tok, context).endswith("\ufffd"):
                for t in candidates:
                    expected = tok.decode([t]) if t == EOS else decode(tok, context + [t])[len(decode(tok, context)):]
                    assert strings.alternative(t) == expected, (len(prompt), i, t)
            strings.push(token)

"""The OpenAI response side of `loramix serve`: an answer's choices built from the engine's events (text, the
echoed prompt, log-probabilities in the completions or the chat format, X-LoRA scalings), whole or as stream
deltas, with its token usage.

An answer may be large (an echoed prompt's log-probabilities: a position per token, with its alternatives), so its
log-probabilities are read from the engine's tensors a chunk of positions at a time and written to JSON text at
once (`RawJson`), the whole answer's JSON is written in pieces (`to_json`), and the caller does both off the event
loop. No single `json.dumps` call writes more than one chunk of positions, so a thread writing a large answer
lets the event loop run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from ..engine.sampling import PromptLogprobs, TokenLogprob
from ..engine.text import TokenTexts
from .protocol import Choices
from .scheduler import Event, Request

LOGPROB_FLOOR = -9999.0  # what -inf is reported as: JSON has no infinities
CHUNK_POSITIONS = 256  # log-probability positions turned into JSON at a time
_dumps = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


@dataclass(frozen=True)
class RawJson:
    """A value already written as JSON text, put into an answer as it is by `to_json`."""

    text: str


def to_json(value) -> str:
    """The JSON text of an answer (dicts, lists, scalars and `RawJson`), compact, non-ASCII as it is (what FastAPI
    wrote): each dict and each list holding containers written item by item, any other value by one `json.dumps`."""
    out: list[str] = []
    _write(value, out)
    return "".join(out)


def _write(value, out: list[str]) -> None:
    if isinstance(value, RawJson):
        out.append(value.text)
    elif isinstance(value, dict):
        out.append("{")
        for i, (key, item) in enumerate(value.items()):
            out.append(("," if i else "") + _dumps(str(key)) + ":")
            _write(item, out)
        out.append("}")
    elif isinstance(value, (list, tuple)) and any(isinstance(item, (dict, list, tuple, RawJson)) for item in value):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _write(item, out)
        out.append("]")
    else:
        out.append(_dumps(value))


def usage(prompts: list[list[int]], jobs: list[Request]) -> dict:
    """Token counts: each prompt once (whatever n), every choice's new tokens."""
    n_prompt = sum(len(p) for p in prompts)
    n_new = sum(job.n_generated for job in jobs)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}


def _floor(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


class Reply:
    """The choices of one answer, built from the engine's events: text (the echoed prompt first), log-probabilities
    in the completions or the chat format, scalings; whole (`add`, then `choice`) or as stream deltas."""

    def __init__(self, tokenizer, chat: bool, choices: Choices, prompts: list[list[int]],
                 texts: list[str | None]) -> None:
        self.tokenizer, self.chat, self.choices = tokenizer, chat, choices
        self.prompts, self.texts = prompts, texts
        rows = len(prompts) * choices.n
        self.parts: list[list[str]] = [[] for _ in range(rows)]
        self.scalings: list[list] = [[] for _ in range(rows)]
        self.prompt_logprobs: list[PromptLogprobs | None] = [None] * rows  # the echoed prompt's
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(rows)]  # the new tokens'
        self.reasons: list[str | None] = [None] * rows
        self.offsets = [0] * rows  # text_offset of the next streamed token
        self.strings: list[TokenTexts | None] = [None] * rows  # each choice's token strings, made on first use

    def token_texts(self, index: int) -> TokenTexts:
        """The token strings of choice `index` (engine/text.py): decoded against the tokens before them, from the
        prompt's first token when it is echoed (its tokens come first), else from the first new token."""
        if self.strings[index] is None:
            context = [] if self.choices.echo else self.prompts[index // self.choices.n]
            self.strings[index] = TokenTexts(self.tokenizer, context)
        return self.strings[index]

    def echo_text(self, index: int) -> str:
        """The prompt of choice `index` as text (token-id prompts decoded)."""
        p = index // self.choices.n
        if self.texts[p] is None:
            self.texts[p] = self.tokenizer.decode(self.prompts[p])
        return self.texts[p]

    def add(self, index: int, event: Event) -> None:
        self.parts[index].append(event.text)
        self.scalings[index] += event.scalings or []
        if event.prompt_logprobs is not None:
            self.prompt_logprobs[index] = event.prompt_logprobs
        self.logprobs[index] += event.logprobs or []
        self.reasons[index] = event.finish_reason or self.reasons[index]

    def choice(self, index: int) -> dict:
        """Choice `index` of the whole answer."""
        text = "".join(self.parts[index])
        if self.choices.echo:
            text = self.echo_text(index) + text
        choice = {"index": index, "finish_reason": self.reasons[index],
                  "logprobs": self._logprobs(index, self.prompt_logprobs[index], self.logprobs[index])}
        choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
        if self.choices.scalings:
            choice["xlora"] = {"scalings": self.scalings[index]}
        return choice

    def first_delta(self, index: int) -> dict | None:
        """What a stream sends for a choice before any event: the chat role, or the echoed prompt when no
        log-probabilities come with it (else it comes with the prompt's, in the first event)."""
        if self.chat:
            return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None}
        if self.choices.echo and self.choices.logprobs is None:
            return {"index": index, "text": self.echo_text(index), "logprobs": None, "finish_reason": None}
        return None

    def delta(self, index: int, event: Event) -> dict | None:
        """The stream chunk's choice for one event, or None when it carries nothing."""
        text = event.text
        if event.prompt_logprobs is not None:
            text = self.echo_text(index) + text
        entries = event.logprobs or []
        if not (text or entries or event.prompt_logprobs is not None or event.scalings):
            return None
        has_logprobs = entries or event.prompt_logprobs is not None
        logprobs = self._logprobs(index, event.prompt_logprobs, entries) if has_logprobs else None
        if self.chat:
            return {"index": index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                    "finish_reason": None}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}

    def end(self, index: int, reason: str) -> dict:
        if self.chat:
            return {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}
        return {"index": index, "text": "", "logprobs": None, "finish_reason": reason}

    def _logprobs(self, index: int, prompt: PromptLogprobs | None, entries: list[TokenLogprob]):
        """Log-probabilities of these tokens of choice `index` (the echoed prompt's `prompt`, then the new tokens'
        `entries`): the chat format (`content`: token, logprob, bytes, top_logprobs) or the completions format
        (`tokens`, `token_logprobs`, `top_logprobs` a dict per position with the chosen token in it, `text_offset`
        into the choice's text, counted across chunks), the latter as JSON text (`RawJson`) written
        CHUNK_POSITIONS at a time."""
        if self.choices.logprobs is None:
            return None
        strings = self.token_texts(index)
        if self.chat:
            def item(text: str, logprob: float) -> dict:
                return {"token": text, "logprob": _floor(logprob), "bytes": list(text.encode("utf-8"))}
            content = []
            for part in _chunks(prompt, entries):
                for e in part:
                    text, top = _token_strings(strings, e)
                    content.append({**item(text, e.logprob),
                                    "top_logprobs": [item(string, lp) for string, (_, lp) in zip(top, e.top)]})
            return {"content": content}
        written: dict[str, list[str]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for part in _chunks(prompt, entries):
            out: dict[str, list] = {key: [] for key in written}
            for e in part:
                text, top = _token_strings(strings, e)
                out["tokens"].append(text)
                out["text_offset"].append(self.offsets[index])
                self.offsets[index] += len(text)
                if e.logprob is None:  # the prompt's first token: nothing predicts it
                    out["token_logprobs"].append(None)
                    out["top_logprobs"].append(None)
                    continue
                out["token_logprobs"].append(_floor(e.logprob))
                alternatives = {string: _floor(lp) for string, (_, lp) in zip(top, e.top)}
                alternatives.setdefault(text, _floor(e.logprob))
                out["top_logprobs"].append(alternatives)
            for key, items in out.items():
                if items:
                    written[key].append(_dumps(items)[1:-1])  # the items without the list's brackets
        return RawJson("{" + ",".join(f'"{key}":[{",".join(pieces)}]' for key, pieces in written.items()) + "}")


def _chunks(prompt: PromptLogprobs | None, entries: list[TokenLogprob]) -> Iterator[list[TokenLogprob]]:
    """The prompt's positions (read from its tensors), then the new tokens', CHUNK_POSITIONS at a time."""
    if prompt is not None:
        for start in range(0, len(prompt), CHUNK_POSITIONS):
            yield prompt.entries(start, min(start + CHUNK_POSITIONS, len(prompt)))
    for start in range(0, len(entries), CHUNK_POSITIONS):
        yield entries[start:start + CHUNK_POSITIONS]


def _token_strings(strings: TokenTexts, entry: TokenLogprob) -> tuple[str, list[str]]:
    """The string of the entry's token and those of its alternatives (in order), all in the context before it."""
    others = {t: strings.alternative(t) for t, _ in entry.top if t != entry.token}
    text = strings.push(entry.token)
    return text, [text if t == entry.token else others[t] for t, _ in entry.top]

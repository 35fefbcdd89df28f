"""The OpenAI response side of `loramix serve`: an answer's choices built from the engine's events (text, the
echoed prompt, log-probabilities in the completions or the chat format, X-LoRA scalings), whole or as stream
deltas, and its token usage."""

from __future__ import annotations

from ..engine.sampling import TokenLogprob
from ..engine.text import TokenTexts
from .protocol import Choices
from .scheduler import Event, Request

LOGPROB_FLOOR = -9999.0  # what -inf is reported as: JSON has no infinities


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
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(rows)]  # echoed prompt's, then new tokens'
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
        self.logprobs[index] += (event.prompt_logprobs or []) + (event.logprobs or [])
        self.reasons[index] = event.finish_reason or self.reasons[index]

    def choice(self, index: int) -> dict:
        """Choice `index` of the whole answer."""
        text = "".join(self.parts[index])
        if self.choices.echo:
            text = self.echo_text(index) + text
        choice = {"index": index, "finish_reason": self.reasons[index],
                  "logprobs": self._logprobs(index, self.logprobs[index])}
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
        entries = (event.prompt_logprobs or []) + (event.logprobs or [])
        if not (text or entries or event.scalings):
            return None
        logprobs = self._logprobs(index, entries) if entries else None
        if self.chat:
            return {"index": index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                    "finish_reason": None}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}

    def end(self, index: int, reason: str) -> dict:
        if self.chat:
            return {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}
        return {"index": index, "text": "", "logprobs": None, "finish_reason": reason}

    def _logprobs(self, index: int, entries: list[TokenLogprob]) -> dict | None:
        """Log-probabilities of these tokens of choice `index`: the chat format (`content`: token, logprob,
        bytes, top_logprobs) or the completions format (`tokens`, `token_logprobs`, `top_logprobs` a dict per
        position with the chosen token in it, `text_offset` into the choice's text, counted across chunks)."""
        if self.choices.logprobs is None:
            return None
        strings = self.token_texts(index)
        if self.chat:
            def item(text: str, logprob: float) -> dict:
                return {"token": text, "logprob": _floor(logprob), "bytes": list(text.encode("utf-8"))}
            content = []
            for e in entries:
                text, top = _token_strings(strings, e)
                content.append({**item(text, e.logprob),
                                "top_logprobs": [item(string, lp) for string, (_, lp) in zip(top, e.top)]})
            return {"content": content}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
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
        return out


def _token_strings(strings: TokenTexts, entry: TokenLogprob) -> tuple[str, list[str]]:
    """The string of the entry's token and those of its alternatives (in order), all in the context before it."""
    others = {t: strings.alternative(t) for t, _ in entry.top if t != entry.token}
    text = strings.push(entry.token)
    return text, [text if t == entry.token else others[t] for t, _ in entry.top]

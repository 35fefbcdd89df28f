"""The text rule: how generated token ids become text, one token at a time, decoded against the tokens before them.

`TextDecoder` is the core. Decoding new ids on their own loses text with SentencePiece-style tokenizers
(Metaspace, or Llama-2's `Strip` decoder): a decode drops the leading space of its first token, so " 67" would come
out as "67". Each step therefore decodes a short window `window` that starts before the new tokens and hands out
what the new tokens add to the window's older part `window[:read]` (the tokens of the previous delta, or the
context's tail at first):

    delta = decode(window)[len(decode(window[:read])):]      (special tokens skipped)

then the window starts where this delta's tokens start. A window whose text ends in U+FFFD (a token that stops
inside a multi-byte character) hands out nothing yet; the tokens that complete the character hand it out. A step
decodes two windows of a few tokens (held tokens widen them), not the whole sequence. Joined, the deltas are

    decode(context + pushed)[len(decode(context)):]

for any tokenizer whose decode of a sequence extends the decode of its prefix (byte-level BPE, SentencePiece),
except an incomplete character at the very end, which never shows.

On it: `RowText`, the text of one generated row (the text ends at an EOS, is cut before the first stop string, and a
tail that could still grow into a stop string is held back while the row runs); `TokenTexts`, the strings that
log-probabilities show for tokens (joined, a row's token strings are its text; a special token shows its name).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

REPLACEMENT = "\ufffd"  # what a decode shows for bytes that are not (yet) a whole UTF-8 character
CONTEXT_TOKENS = 5  # context tokens decoded before the first new one: the first-token rules apply to them
MAX_CHAR_TOKENS = 4  # a UTF-8 character has at most 4 bytes: a window never needs to start more tokens back


class TextDecoder:
    """Token ids -> text, one token at a time, each decoded in the context of the tokens before it (see the module
    docstring). `context`: the ids the new ones follow (a prompt); only its last few non-special tokens are kept."""

    def __init__(self, tokenizer, context: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.window, self.older_text = self._tail(context, set(tokenizer.all_special_ids))
        self.read = len(self.window)  # window[:read] decode to older_text; window[read:]: text not handed out yet

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _tail(self, context: Sequence[int], special: set[int]) -> tuple[list[int], str]:
        """The last CONTEXT_TOKENS non-special context tokens and their text, started up to MAX_CHAR_TOKENS - 1
        tokens earlier where the window would otherwise begin inside a character."""
        tokens: list[int] = []
        for token in reversed(context):
            if token not in special:
                tokens.append(token)
                if len(tokens) == CONTEXT_TOKENS + MAX_CHAR_TOKENS - 1:
                    break
        tokens.reverse()
        start = max(0, len(tokens) - CONTEXT_TOKENS)
        text = self.decode(tokens[start:])
        while start > 0 and text.startswith(REPLACEMENT):
            start -= 1
            text = self.decode(tokens[start:])
        return tokens[start:], text

    def push(self, token: int) -> str:
        """Add a token; returns the text it completes: "" while it ends inside a character or adds no text (a
        special token), else its own text and that of the tokens held before it."""
        self.window.append(token)
        text = self.decode(self.window)
        if text.endswith(REPLACEMENT) or len(text) <= len(self.older_text):
            return ""
        delta = text[len(self.older_text):]
        del self.window[:self.read]  # the next window starts with this delta's tokens
        self.read = len(self.window)
        self.older_text = self.decode(self.window)
        return delta

    def peek(self, token: int) -> str:
        """The text `token` would add if it came next (held tokens' text included), without adding it; a token
        that would end inside a character shows U+FFFD."""
        return self.decode(self.window + [token])[len(self.older_text):]


class RowText:
    """The text of one generated row, handed out in pieces (`take`).

    The text is the decoded tokens (`TextDecoder`, in the context of the prompt) up to the first EOS, cut before
    the first occurrence of a stop string; `stopped` says that a stop string has occurred (the row ends there).
    Stop strings are matched by `StopMatcher`: each new character costs a step or two per stop string, whatever
    the stop strings' lengths and however much text is held back."""

    def __init__(self, tokenizer, prompt: Sequence[int], stop: Iterable[str] = (),
                 eos_token_ids: Iterable[int] = ()) -> None:
        self.decoder = TextDecoder(tokenizer, prompt)
        self.stop = list(stop)
        self.matcher = StopMatcher(self.stop)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.unsent = ""  # the text not handed out yet
        self.ended = False  # an EOS or a stop string has come: nothing after it is text
        self.stopped = False  # a stop string has come (the text ends before it)

    def push(self, token: int) -> None:
        """Record the next generated token: an EOS ends the text, any other token adds its text (once whole)."""
        if self.ended or token in self.eos_token_ids:
            self.ended = True
            return
        piece = self.decoder.push(token)
        if not piece:
            return
        at = self.matcher.feed(piece)  # where in the piece the first stop string starts (negative: before it)
        self.unsent += piece
        if at is not None:
            self.unsent = self.unsent[:max(0, len(self.unsent) - len(piece) + at)]
            self.ended = self.stopped = True

    def take(self, final: bool) -> str:
        """The text not handed out yet. While the row runs (`final` False, no stop string yet) its longest tail
        that is the start of a stop string is held back; at the end (`final`) all of it."""
        end = len(self.unsent)
        if not (final or self.ended):
            end -= min(self.matcher.held(), end)
        piece, self.unsent = self.unsent[:end], self.unsent[end:]
        return piece


class StopMatcher:
    """The first occurrence of any stop string in a text fed piece by piece, by one Knuth-Morris-Pratt automaton
    per stop string: `state[j]` is the length of the longest tail of the text so far that is a proper start of
    stop string j, and a new character moves it by one step forward and amortised at most one step back along the
    string's border table (`_borders`). So matching costs at most 2 steps per character and stop string
    (`steps` counts them), whatever the stop strings' lengths, and the tail to hold back is `held()`, read off the
    states. The first occurrence is the one that starts first among those ending in the piece that completes
    one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = list(stops)
        self.borders = [_borders(s) for s in self.stops]
        self.state = [0] * len(self.stops)
        self.steps = 0

    def feed(self, piece: str) -> int | None:
        """Advance over `piece`; the offset in `piece` where the first stop string completed in it starts (negative
        when it starts in the text before), or None."""
        first = None
        for j, (stop, borders) in enumerate(zip(self.stops, self.borders)):
            k, steps = self.state[j], 0
            for i, char in enumerate(piece):
                while k and stop[k] != char:
                    k = borders[k]
                    steps += 1
                if stop[k] == char:
                    k += 1
                steps += 1
                if k == len(stop):  # the first occurrence of this stop string: it ends at piece[i]
                    start = i + 1 - k
                    first = start if first is None else min(first, start)
                    k = borders[k]
                    break
            self.state[j] = k
            self.steps += steps
        return first

    def held(self) -> int:
        """The length of the text's longest tail that is a proper start of a stop string (0 without any)."""
        return max(self.state, default=0)


@functools.lru_cache(maxsize=64)
def _borders(stop: str) -> tuple[int, ...]:
    """Knuth-Morris-Pratt's table of `stop`: entry k (1 <= k <= len) is the length of the longest proper prefix of
    stop[:k] that is also its suffix; entry 0 is 0. Rows of one request share their stop strings' tables."""
    table, k = [0] * (len(stop) + 1), 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = table[k]
        if stop[i] == stop[k]:
            k += 1
        table[i + 1] = k
    return tuple(table)


class TokenTexts:
    """The strings that log-probabilities show for a row's tokens: each token's share of the text, decoded against
    the tokens before it (`TextDecoder`), so that joined they are the text; a special token shows its own name (it
    adds no text). A token that ends inside a character shows "" and the one that completes it the character.
    `context`: the ids before the first token pushed (the prompt, or nothing when the prompt's own tokens come
    first)."""

    def __init__(self, tokenizer, context: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.decoder = TextDecoder(tokenizer, context)
        self.special = set(tokenizer.all_special_ids)

    def push(self, token: int) -> str:
        """The string of the next token of the row."""
        if token in self.special:
            return self.tokenizer.decode([token])
        return self.decoder.push(token)

    def alternative(self, token: int) -> str:
        """The string of a token that could have come next instead (a top log-probability), in the same context."""
        if token in self.special:
            return self.tokenizer.decode([token])
        return self.decoder.peek(token)


def until_eos(tokens: Iterable[int], eos_token_ids: Iterable[int]) -> list[int]:
    """The generated tokens that make a row's text: those before its first EOS."""
    eos, kept = frozenset(eos_token_ids), []
    for token in tokens:
        if token in eos:
            break
        kept.append(token)
    return kept


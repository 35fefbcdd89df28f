"""POST /v1/completions: the body's prompts (texts or token ids) checked and tokenized, then run."""

from __future__ import annotations

from fastapi import Request as HttpRequest

from .admission import check_characters, check_length, check_logprob_entries, check_rows, read_body, tokenize
from .protocol import ApiError, options_from, prompt_list
from .requests import run
from .state import ServerState


async def create_completion(state: ServerState, http: HttpRequest):
    """Answer one completions request: every prompt's choices, whole or streamed."""
    body = await read_body(state, http)
    options = options_from(body, chat=False, ranges=state.ranges)
    prompts = prompt_list(body.get("prompt"))
    check_rows(state, len(prompts), options.choices.n)
    ids, texts = [], []
    for prompt in prompts:
        if isinstance(prompt, str):
            check_characters(state, prompt, "prompt")
            ids.append(await tokenize(state, prompt, "prompt"))
            texts.append(prompt)
        else:
            check_length(state, len(prompt), "prompt")
            if any(not 0 <= t < len(state.tokenizer) for t in prompt):
                raise ApiError(400, "prompt: a token id is outside the vocabulary", param="prompt")
            ids.append(list(prompt))
            texts.append(None)  # decoded only when echoed
    check_logprob_entries(state, [len(p) for p in ids], options)
    return await run(state, http, options, ids, texts, chat=False)

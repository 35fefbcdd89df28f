"""POST /v1/chat/completions: the body's messages checked, rendered by the tokenizer's chat template, tokenized,
then run."""

from __future__ import annotations

from fastapi import Request as HttpRequest

from .admission import check_characters, check_logprob_entries, check_rows, read_body, tokenize
from .protocol import ApiError, options_from
from .requests import run
from .state import ServerState


def _messages(body: dict) -> list[dict]:
    """The body's messages as {role, content} objects; 400 for anything else."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects with string content",
                       param="messages")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


async def create_chat_completion(state: ServerState, http: HttpRequest):
    """Answer one chat request: its choices for the templated conversation, whole or streamed."""
    body = await read_body(state, http)
    options = options_from(body, chat=True, ranges=state.ranges)
    check_rows(state, 1, options.choices.n)
    messages = _messages(body)
    if getattr(state.tokenizer, "chat_template", None) is None:
        raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions or start the "
                            "server with --chat-template FILE", param="messages")
    check_characters(state, "".join(m["content"] for m in messages), "messages")  # the template only adds text
    try:
        text = await state.tokenize(state.tokenizer.apply_chat_template, messages, tokenize=False,
                                    add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - jinja errors from the template (e.g. unsupported roles)
        raise ApiError(400, f"messages: the chat template failed: {e}", param="messages") from None
    check_characters(state, text, "messages")
    ids = await tokenize(state, text, "messages", add_special_tokens=False)
    check_logprob_entries(state, [len(ids)], options)
    return await run(state, http, options, [ids], [text], chat=True)

"""Whether a request fits the running server, checked cheapest first: its body declared JSON and within the byte
limit, the model it names, its rows against the engine's room, its prompts' length in characters, then in tokens
(tokenized off the event loop), then the log-probability entries its answer would hold. Each refusal is a 4xx
`ApiError` naming the field."""

from __future__ import annotations

from fastapi import Request as HttpRequest

from .protocol import ApiError, RequestOptions, parse_body, short_value
from .state import ServerState


def check_content_type(value: str | None) -> None:
    """A request body must be declared `application/json` (a charset, if given, UTF-8): 415 otherwise, before the
    body is read. Browsers send text/plain, application/x-www-form-urlencoded and multipart/form-data across sites
    without asking first (no CORS preflight), so accepting them would let any web page drive a local server."""
    media, _, parameters = (value or "").partition(";")
    charset = next((v.strip().strip('"').lower() for k, _, v in (p.partition("=") for p in parameters.split(";"))
                    if k.strip().lower() == "charset"), "utf-8")
    if media.strip().lower() == "application/json" and charset in ("utf-8", "utf8"):
        return
    got = "no Content-Type" if value is None else f"Content-Type {short_value(value)}"
    raise ApiError(415, f"the request body must be sent as Content-Type: application/json (UTF-8), got {got}",
                   code="unsupported_media_type")


async def read_body(state: ServerState, http: HttpRequest) -> dict:
    """The body as a JSON object naming the served model: 415 unless it is declared application/json, 413 past
    --max-request-bytes, both before it is read."""
    state.check_open()
    check_content_type(http.headers.get("content-type"))
    limit = state.settings.max_request_bytes
    too_big = ApiError(413, f"the request body is larger than this server's limit of {limit} bytes "
                            "(--max-request-bytes)", code="request_too_large")
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    body = parse_body(b"".join(chunks))
    check_model(body, state.model_name)
    return body


def check_model(body: dict, served: str) -> None:
    """The body's `model` is the served one (400 without one, 404 for another)."""
    name = body.get("model")
    if name is None:
        raise ApiError(400, "model is required", param="model")
    if name != served:
        raise ApiError(404, f"The model {short_value(name)} does not exist; this server serves '{served}'",
                       param="model", code="model_not_found")


def check_rows(state: ServerState, n_prompts: int, n: int) -> None:
    """Each prompt x choice is a row of the engine: a request may not ask for more than it could ever hold
    (`n` alone is bounded by the field ranges)."""
    limit = state.max_rows
    if n_prompts * n > limit:
        raise ApiError(400, f"{n_prompts} prompts x n = {n} ask for {n_prompts * n} sequences; this server "
                            f"takes at most {limit} (--max-batch + --max-queue) in one request", param="prompt")


def check_characters(state: ServerState, text: str, param: str) -> None:
    """A text whose non-blank characters no context could hold is refused before tokenizing."""
    limit = state.max_prompt_chars
    if limit is not None and len(text) > limit and len("".join(text.split())) > limit:
        raise ApiError(400, f"the {param} has over {limit} non-blank characters, more than this model's context "
                            f"of {state.context} tokens can hold", param=param, code="context_length_exceeded")


def check_length(state: ServerState, n_tokens: int, param: str) -> None:
    """A prompt has tokens, fewer than the model's context."""
    if n_tokens == 0:
        raise ApiError(400, "the prompt has no tokens", param=param)
    if state.context is not None and n_tokens >= state.context:
        raise ApiError(400, f"the prompt has {n_tokens} tokens; this model's context is {state.context}",
                       param=param, code="context_length_exceeded")


async def tokenize(state: ServerState, text: str, param: str, **kwargs) -> list[int]:
    """The text's token ids (on the tokenizer thread), checked by `check_length`; 400 if the tokenizer fails."""
    try:
        ids = (await state.tokenize(state.tokenizer, text, **kwargs))["input_ids"]
    except Exception as e:  # noqa: BLE001 - text the tokenizer refuses
        raise ApiError(400, f"{param}: the tokenizer failed: {type(e).__name__}: {e}", param=param) from None
    check_length(state, len(ids), param)
    return ids


def logprob_entries(prompt_lengths: list[int], options: RequestOptions) -> int:
    """The log-probability entries an answer may hold: each choice of each prompt reports (echoed prompt tokens +
    max_tokens) positions, each with the chosen token and `logprobs` alternatives:

        sum over prompts of  n x ((prompt tokens if echo else 0) + max_tokens) x (1 + logprobs)

    0 when the request asks for no log-probabilities."""
    choices = options.choices
    if choices.logprobs is None:
        return 0
    positions = sum((length if choices.echo else 0) + options.params.max_new_tokens for length in prompt_lengths)
    return choices.n * positions * (1 + choices.logprobs)


def check_logprob_entries(state: ServerState, prompt_lengths: list[int], options: RequestOptions) -> None:
    """An answer bounded in size: more log-probability entries than --max-logprob-entries (`logprob_entries`) is
    a 400 naming `logprobs`, before anything runs."""
    entries, limit = logprob_entries(prompt_lengths, options), state.settings.max_logprob_entries
    if entries > limit:
        raise ApiError(400, f"logprobs: this request's answer would hold {entries} log-probability entries, "
                            "(echoed prompt tokens + max_tokens) x n x (1 + logprobs) summed over its prompts; this "
                            f"server answers at most {limit} (--max-logprob-entries): ask for fewer prompts, tokens "
                            "or alternatives", param="logprobs")

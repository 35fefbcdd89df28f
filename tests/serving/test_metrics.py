"""GET /metrics: read back with prometheus_client's own parser after real requests, every count checked against
what was sent and what the answers report (usage, log-probability tokens); behind the API key when one is set."""

from __future__ import annotations

import threading

import httpx
import pytest
from helpers import openai_client, post_json, serving, slow_down_engine, wait_until

pytest.importorskip("prometheus_client")
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

MODEL = "tiny-xlora"
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


def scrape(server, **kw) -> dict[tuple[str, tuple], float]:
    """The server's metrics through prometheus_client's parser: (sample name, sorted labels) -> value."""
    response = httpx.get(server.url + "/metrics", timeout=30, **kw)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST  # Prometheus' text format
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: dict, after: dict, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_counts_equal_the_requests_sent_and_the_tokens_answered(live):
    _, server = live
    before = scrape(server)
    # completions: two prompts x n = 2, each choice's tokens listed by logprobs; then one prompt
    first = post_json(server, COMPLETIONS, {"model": MODEL, "prompt": ["mixture of", "experts"], "n": 2,
                                            "max_tokens": 5, "logprobs": 0, "temperature": 0}).json()
    second = post_json(server, COMPLETIONS, {"model": MODEL, "prompt": "gate", "max_tokens": 3,
                                             "logprobs": 0}).json()
    # a streamed chat answer through the OpenAI client, with its usage in the last chunk
    chunks = list(openai_client(server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi there"}], max_tokens=4, stream=True,
        stream_options={"include_usage": True}))
    chat_usage = chunks[-1].usage
    # refused ones: a bad field (400), another model (404), a path no route serves (404)
    assert post_json(server, COMPLETIONS, {"model": MODEL, "prompt": "x", "temperature": 5}).status_code == 400
    assert post_json(server, COMPLETIONS, {"model": "other", "prompt": "x"}).status_code == 404
    assert httpx.get(server.url + "/no/such/path").status_code == 404
    after = scrape(server)

    assert delta(before, after, "loramix_requests_total", endpoint=COMPLETIONS, status="200") == 2
    assert delta(before, after, "loramix_requests_total", endpoint=COMPLETIONS, status="400") == 1
    assert delta(before, after, "loramix_requests_total", endpoint=COMPLETIONS, status="404") == 1
    assert delta(before, after, "loramix_requests_total", endpoint=CHAT, status="200") == 1
    assert delta(before, after, "loramix_requests_total", endpoint="other", status="404") == 1
    # the scrape before this one is counted too, as answered (the one running now is not, yet)
    assert delta(before, after, "loramix_requests_total", endpoint="/metrics", status="200") == 1
    assert delta(before, after, "loramix_request_duration_seconds_count", endpoint=COMPLETIONS) == 4
    assert delta(before, after, "loramix_request_duration_seconds_count", endpoint=CHAT) == 1
    # tokens: exactly the usage the answers report
    prompt_tokens = first["usage"]["prompt_tokens"] + second["usage"]["prompt_tokens"] + chat_usage.prompt_tokens
    new_tokens = (first["usage"]["completion_tokens"] + second["usage"]["completion_tokens"]
                  + chat_usage.completion_tokens)
    assert delta(before, after, "loramix_prompt_tokens_total") == prompt_tokens
    assert delta(before, after, "loramix_generation_tokens_total") == new_tokens > 0
    # one first token per choice that generated any: the choices' own token lists say which
    choices = first["choices"] + second["choices"]
    assert sum(len(c["logprobs"]["tokens"]) for c in choices) == new_tokens - chat_usage.completion_tokens
    with_tokens = sum(bool(c["logprobs"]["tokens"]) for c in choices)
    assert delta(before, after, "loramix_time_to_first_token_seconds_count", endpoint=COMPLETIONS) == with_tokens
    assert delta(before, after, "loramix_time_to_first_token_seconds_count", endpoint=CHAT) == (
        chat_usage.completion_tokens > 0)
    # histograms: the buckets are cumulative and +Inf holds every observation
    count = value(after, "loramix_time_to_first_token_seconds_count", endpoint=COMPLETIONS)
    assert value(after, "loramix_time_to_first_token_seconds_bucket", endpoint=COMPLETIONS, le="+Inf") == count
    assert 0 < value(after, "loramix_time_to_first_token_seconds_sum", endpoint=COMPLETIONS)
    # idle again: nothing running, waiting or in progress
    assert value(after, "loramix_rows_running") == value(after, "loramix_rows_waiting") == 0
    assert value(after, "loramix_requests_in_progress", endpoint=COMPLETIONS) == 0


def test_rows_running_and_waiting_while_a_call_is_decoding(live, monkeypatch):
    """n = 10 on a server decoding 8 rows at once: 8 run, 2 wait, one call in progress, while a slow model
    decodes (greedy: every row the same tokens, none ending before max_tokens)."""
    state, server = live
    slow_down_engine(state, monkeypatch, 0.1)
    answers = []
    call = threading.Thread(target=lambda: answers.append(post_json(
        server, COMPLETIONS, {"model": MODEL, "prompt": "slow", "n": 10, "max_tokens": 10, "temperature": 0})))
    call.start()
    try:
        assert wait_until(lambda: state.engine.active_rows() == 8, timeout=30) is not None
        during = scrape(server)
    finally:
        call.join(timeout=60)
    assert value(during, "loramix_rows_running") == 8
    assert value(during, "loramix_rows_waiting") == 2
    assert value(during, "loramix_requests_in_progress", endpoint=COMPLETIONS) == 1
    assert answers and answers[0].status_code == 200
    # no row ended early (EOS): the first 8 held their places for 10 slow steps, while the scrape ran
    assert [c["finish_reason"] for c in answers[0].json()["choices"]] == ["length"] * 10


def test_metrics_need_the_api_key_and_count_the_refusals(served_checkpoint):
    with serving(served_checkpoint, api_key="sesame") as (_, server):
        assert httpx.get(server.url + "/metrics").status_code == 401
        assert httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        samples = scrape(server, headers={"Authorization": "Bearer sesame"})
        assert value(samples, "loramix_requests_total", endpoint="/metrics", status="401") == 2
        assert value(samples, "loramix_requests_total", endpoint="/metrics", status="200") == 0
        assert httpx.get(server.url + "/health").status_code == 200  # still open

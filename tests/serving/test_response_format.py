"""`response_format`: plain text ({"type": "text"}) is answered as without it; a JSON mode, which would need
decoding constrained to JSON, is refused with a 400 naming the field (seen through the official OpenAI client),
before anything reaches the engine."""

from __future__ import annotations

import pytest
from helpers import openai_client, post_json

openai = pytest.importorskip("openai")

MODEL = "tiny-xlora"
MESSAGES = [{"role": "user", "content": "answer in JSON"}]


@pytest.mark.parametrize("response_format", [{"type": "json_object"}, {
    "type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}}])
def test_json_modes_are_refused_with_a_400_naming_the_field(live, response_format):
    state, server = live
    requests_before = state.engine.stats["requests"]
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client(server).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                                      response_format=response_format)
    assert caught.value.status_code == 400 and caught.value.param == "response_format"
    assert f'"type": "{response_format["type"]}"' in caught.value.message and "not supported" in caught.value.message
    # completions take the field too (the OpenAI client sends it as an extra body field)
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client(server).completions.create(model=MODEL, prompt="x", max_tokens=4,
                                                 extra_body={"response_format": response_format})
    assert caught.value.param == "response_format"
    assert state.engine.stats["requests"] == requests_before  # nothing was generated


def test_text_is_answered_as_without_the_field(live):
    _, server = live
    client = openai_client(server)
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0)
    text = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                          response_format={"type": "text"})
    assert text.choices[0].message.content == plain.choices[0].message.content
    assert text.usage.completion_tokens == plain.usage.completion_tokens


@pytest.mark.parametrize("bad", ["json_object", {"type": "xml"}, {"type": "text", "extra": 1}, {}])
def test_anything_else_is_a_400_naming_the_field(live, bad):
    _, server = live
    response = post_json(server, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES,
                                                          "response_format": bad})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "response_format"

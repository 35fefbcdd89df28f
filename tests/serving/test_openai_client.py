"""The OpenAI API as evaluators use it: prompt lists, token-id prompts, `n` choices, log-probabilities (completions
and chat, whole and streamed), `echo` with `max_tokens: 0`. Every number is checked against a direct log_softmax
of the X-LoRA model's logits on the same tokens."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from helpers import CHAT_TEMPLATE, openai_client, post_json, serving, slow_down_engine, tiny_tokenizer, wait_until

from loramix.config import GateOptions
from loramix.engine.sampling import prompt_logprob_table, prompt_logprobs

MODEL = "tiny-xlora"


@pytest.fixture(scope="module")
def model(reference):
    """The independent copy of the served model (conftest's `reference`)."""
    return reference[0]


def _distribution(model, ids: list[int], temperature: float = 1.0, **gate) -> torch.Tensor:
    """log_softmax(logits / T) of one plain forward (no cache): row t predicts token t + 1. (t, vocab)"""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), **gate).logits[0].double()
    return torch.log_softmax(logits / temperature, dim=-1)


def _complete(server, **body) -> dict:
    response = post_json(server, "/v1/completions", {"model": MODEL, **body})
    assert response.status_code == 200, response.text
    return response.json()


def _ids(text: str) -> list[int]:
    return tiny_tokenizer()(text)["input_ids"]


# ---- the decode core ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_prompt_logprobs_equal_a_direct_log_softmax(model, temperature):
    ids = _ids("mixture of experts")
    reference = _distribution(model, ids, temperature, top_k_lora=2)
    entries = prompt_logprobs(model, ids, top=3, temperature=temperature, gate=GateOptions(top_k_lora=2))
    assert [e.token for e in entries] == ids and entries[0].logprob is None and entries[0].top == []
    for t, entry in enumerate(entries[1:]):
        assert abs(entry.logprob - reference[t, ids[t + 1]].item()) < 1e-4
        values, tokens = reference[t].topk(3)
        assert [tok for tok, _ in entry.top] == tokens.tolist()
        assert torch.allclose(torch.tensor([lp for _, lp in entry.top], dtype=torch.double), values, atol=1e-4)
    with pytest.raises(ValueError, match="temperature"):
        prompt_logprobs(model, ids, temperature=0.0)


@pytest.mark.parametrize("top", [0, 3, 200])
def test_prompt_log_probabilities_a_chunk_at_a_time_equal_the_whole_computation_exactly(model, top):
    """Issue 21: the prompt's table (chosen token and top-k) is computed a chunk of positions at a time, never as a
    float32 log_softmax of every position at once; each chunk size gives exactly the numbers of one computation."""
    torch.manual_seed(3)
    ids = torch.randint(3, 97, (40,)).tolist()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    for temperature in (1.0, 0.7):
        whole = torch.log_softmax(logits[:-1].float() / temperature, dim=-1)  # what was computed before
        chosen = whole.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        values, tokens = whole.topk(min(top, 97), dim=-1)
        for chunk in (1, 3, 16, 39, 1000, None):
            table = prompt_logprob_table(logits, ids, top=top, temperature=temperature, chunk=chunk)
            assert torch.equal(table.chosen, chosen) and torch.equal(table.top_values, values)
            assert torch.equal(table.top_ids, tokens)
        entries = prompt_logprobs(model, ids, top=top, temperature=temperature)
        assert entries == table.entries() and entries[1].logprob == chosen[0].item()
        assert table.entries(5, 9) == entries[5:9] and table.entries(0, 1) == entries[:1]


def test_an_echoed_prefill_keeps_only_the_asked_log_probabilities(model):
    """The prefill that serves `echo` keeps each row's chosen and top-k log-probabilities (tensors of t - 1 and
    (t - 1, k)), not the prompt's (t, vocab) logits, and its first new token's logits are those of a plain prefill."""
    from loramix.engine.batch import DecodeBatch
    from loramix.engine.params import SamplingParams
    from loramix.engine.rows import RowState

    ids = _ids("mixture of experts")
    rows = [RowState.start(ids, SamplingParams(max_new_tokens=4), device=model.device)]
    plain = DecodeBatch(model).prefill(rows, torch.tensor([ids]))
    batch = DecodeBatch(model)
    echoed = batch.prefill(rows, torch.tensor([ids]), prompt_logprobs=5)
    assert torch.allclose(echoed, plain, atol=1e-5) and echoed.shape == (1, 97)
    table = batch.prompt_logprobs[0]
    assert table.chosen.shape == (len(ids) - 1,) and table.top_values.shape == table.top_ids.shape == (len(ids) - 1, 5)
    assert table.entries() == prompt_logprobs(model, ids, top=5)
    assert not any(isinstance(v, torch.Tensor) and v.shape[-1] == 97 and v.dim() > 1 and v.shape[-2] > 1
                   for v in vars(batch).values())


# ---- completions: echo, logprobs, max_tokens 0 -------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0, 0.7])
def test_echo_with_max_tokens_0_gives_the_prompts_log_probabilities(live, model, temperature):
    _, server = live
    prompt = "hello world"
    ids = _ids(prompt)
    out = _complete(server, prompt=prompt, max_tokens=0, echo=True, logprobs=3, temperature=temperature)
    choice = out["choices"][0]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == list(prompt)  # one character per token
    assert logprobs["text_offset"] == list(range(len(prompt)))
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    reference = _distribution(model, ids, temperature or 1.0)  # greedy reports temperature 1
    for t in range(1, len(ids)):
        assert abs(logprobs["token_logprobs"][t] - reference[t - 1, ids[t]].item()) < 1e-4
        values, tokens = reference[t - 1].topk(3)
        expected = {tiny_tokenizer().decode([k]): v for k, v in zip(tokens.tolist(), values.tolist())}
        expected.setdefault(prompt[t], reference[t - 1, ids[t]].item())  # the chosen token is always listed
        top = logprobs["top_logprobs"][t]
        assert top.keys() == expected.keys()
        assert all(abs(top[k] - expected[k]) < 1e-4 for k in top)


@pytest.mark.parametrize("temperature", [0, 0.7])
def test_generated_tokens_log_probabilities_are_those_of_the_sampled_distribution(live, model, temperature):
    _, server = live
    prompt = "abc"
    ids = _ids(prompt)
    out = _complete(server, prompt=prompt, max_tokens=8, echo=True, logprobs=2, temperature=temperature, seed=3,
                    stop=["never-appears-here"])
    logprobs = out["choices"][0]["logprobs"]
    n_new = out["usage"]["completion_tokens"]
    assert len(logprobs["tokens"]) == len(ids) + n_new
    sequence = [tiny_tokenizer().convert_tokens_to_ids(t) for t in logprobs["tokens"]]
    assert sequence[:len(ids)] == ids
    # every number, prompt and generated, is a direct log_softmax over the whole sequence
    reference = _distribution(model, sequence, temperature or 1.0)
    for t in range(1, len(sequence)):
        assert abs(logprobs["token_logprobs"][t] - reference[t - 1, sequence[t]].item()) < 1e-4
        best, second = reference[t - 1].topk(2).indices.tolist()
        expected = {tiny_tokenizer().decode([best]), tiny_tokenizer().decode([second])}
        assert expected <= logprobs["top_logprobs"][t].keys()
    if temperature == 0:  # greedy: every generated token is the argmax, as lm-eval's is_greedy reads it
        for t in range(len(ids), len(sequence)):
            assert logprobs["token_logprobs"][t] == max(logprobs["top_logprobs"][t].values())
    assert out["choices"][0]["text"] == prompt + "".join(logprobs["tokens"][len(ids):])
    # without echo the same request reports the generated tokens only
    plain = _complete(server, prompt=prompt, max_tokens=8, logprobs=2, temperature=temperature, seed=3,
                      stop=["never-appears-here"])["choices"][0]
    assert plain["logprobs"]["tokens"] == logprobs["tokens"][len(ids):]
    assert plain["logprobs"]["token_logprobs"] == pytest.approx(logprobs["token_logprobs"][len(ids):], abs=1e-5)
    assert plain["logprobs"]["text_offset"] == list(range(n_new))  # offsets into the choice's text


def test_lm_evals_loglikelihood_request(live, model):
    """What lm-eval's local-completions sends for a multiple-choice task: token-id lists, echo, one token."""
    _, server = live
    contexts, continuations = ["q: 1+1=", "q: colour?"], ["2", " red"]
    prompts = [_ids(c + x) for c, x in zip(contexts, continuations)]
    out = _complete(server, prompt=prompts, max_tokens=1, logprobs=1, echo=True, temperature=0, seed=1234)
    assert [c["index"] for c in out["choices"]] == [0, 1]
    for choice, context, ids in zip(out["choices"], contexts, prompts):
        n_context = len(_ids(context))
        reference = _distribution(model, ids)
        expected = sum(reference[t - 1, ids[t]].item() for t in range(n_context, len(ids)))
        assert abs(sum(choice["logprobs"]["token_logprobs"][n_context:-1]) - expected) < 1e-4
        assert len(choice["logprobs"]["tokens"]) == len(ids) + 1  # the prompt, then the one generated token


# ---- prompt lists and n -----------------------------------------------------------------------------------------
def test_prompt_lists_give_one_choice_per_prompt_in_order(live):
    _, server = live
    prompts = ["a", "hello", "the gate", "0123"]
    answers = [_complete(server, prompt=p, max_tokens=6, temperature=0) for p in prompts]
    single = [a["choices"][0]["text"] for a in answers]
    for prompt in (prompts, [_ids(p) for p in prompts]):
        out = _complete(server, prompt=prompt, max_tokens=6, temperature=0)
        assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
        assert [c["text"] for c in out["choices"]] == single
        assert out["usage"]["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in answers)
        assert out["usage"]["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in answers)
    assert _complete(server, prompt=_ids("hello"), max_tokens=6, temperature=0)["choices"][0]["text"] == single[1]
    # echo of a token-id prompt returns its text
    assert _complete(server, prompt=[_ids("hello")], max_tokens=0, echo=True)["choices"][0]["text"] == "hello"


def test_n_choices_are_separate_rows_with_derived_seeds(live):
    state, server = live
    body = {"prompt": ["sample", "other"], "max_tokens": 12, "temperature": 1.0, "seed": 11,
            "stop": ["never-appears-here"]}
    state.engine.stats["max_rows_in_step"] = 0
    out = _complete(server, n=3, **body)
    assert state.engine.stats["max_rows_in_step"] > 1  # the choices were decoded together
    texts = [c["text"] for c in out["choices"]]
    assert [c["index"] for c in out["choices"]] == list(range(6))
    assert len(set(texts[:3])) > 1 and len(set(texts[3:])) > 1  # choices of one prompt differ...
    assert [c["text"] for c in _complete(server, n=3, **body)["choices"]] == texts  # ...and are reproducible
    # choice 0 of each prompt is the request with n = 1: a batch of prompts changes no answer
    assert [c["text"] for c in _complete(server, **body)["choices"]] == [texts[0], texts[3]]
    assert out["usage"]["prompt_tokens"] == len(_ids("sample")) + len(_ids("other"))  # each prompt once
    greedy = _complete(server, prompt="abc", n=2, max_tokens=5, temperature=0)["choices"]
    assert greedy[0]["text"] == greedy[1]["text"]


# ---- chat and streaming -----------------------------------------------------------------------------------------
def test_chat_logprobs_in_the_chat_format(live, model):
    _, server = live
    messages = [{"role": "user", "content": "hi there"}]
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    out = openai_client(server).chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0.7,
                                                  seed=2, logprobs=True, top_logprobs=2, stop=["never-appears"])
    content = out.choices[0].logprobs.content
    generated = [tok.convert_tokens_to_ids(c.token) for c in content]
    assert len(content) == 6 and "".join(c.token for c in content) == out.choices[0].message.content
    reference = _distribution(model, ids + generated, 0.7)
    for i, entry in enumerate(content):
        position = len(ids) + i - 1
        assert abs(entry.logprob - reference[position, generated[i]].item()) < 1e-4
        assert entry.bytes == list(entry.token.encode("utf-8"))
        values, tokens = reference[position].topk(2)
        assert [t.token for t in entry.top_logprobs] == [tok.decode([k]) for k in tokens.tolist()]
        assert all(abs(t.logprob - v) < 1e-4 for t, v in zip(entry.top_logprobs, values.tolist()))
    # streamed: the same entries, spread over the chunks
    chunks = list(openai_client(server).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0.7, seed=2, logprobs=True, top_logprobs=2,
        stop=["never-appears"], stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in content]
    plain = openai_client(server).chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    assert plain.choices[0].logprobs is None


def test_streamed_completions_carry_the_same_logprobs_and_echo(live):
    _, server = live
    body = {"model": MODEL, "prompt": ["abc", "xy"], "n": 2, "max_tokens": 5, "temperature": 0.9, "seed": 4,
            "echo": True, "logprobs": 1, "stop": ["never-appears-here"]}
    whole = post_json(server, "/v1/completions", body).json()["choices"]
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    merged = {i: {"text": "", "tokens": [], "token_logprobs": [], "text_offset": [], "finish_reason": None}
              for i in range(4)}
    for line in lines[:-1]:
        (choice,) = json.loads(line[len("data: "):])["choices"]
        into = merged[choice["index"]]
        into["text"] += choice["text"]
        into["finish_reason"] = choice["finish_reason"] or into["finish_reason"]
        for key in ("tokens", "token_logprobs", "text_offset"):
            into[key] += (choice["logprobs"] or {}).get(key, [])
    for choice in whole:
        streamed = merged[choice["index"]]
        assert streamed["text"] == choice["text"] and streamed["finish_reason"] == choice["finish_reason"]
        for key in ("tokens", "text_offset"):
            assert streamed[key] == choice["logprobs"][key]
        assert streamed["token_logprobs"] == pytest.approx(choice["logprobs"]["token_logprobs"], abs=1e-6)


@pytest.mark.parametrize("body, param", [
    ({"logprobs": 2}, "logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"echo": True}, "echo"),
    ({"n": 17}, "n"),
])
def test_bad_chat_fields_get_400_naming_them(live, body, param):
    _, server = live
    response = post_json(server, "/v1/chat/completions",
                     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body})
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_max_tokens_0_needs_echo(live):
    _, server = live
    response = post_json(server, "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 0})
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"
    out = _complete(server, prompt="ab", max_tokens=0, echo=True)  # no logprobs: the prompt alone
    assert out["choices"][0]["text"] == "ab" and out["choices"][0]["logprobs"] is None


def test_a_client_that_hangs_up_frees_every_row_of_its_request(served_checkpoint, monkeypatch):
    with serving(served_checkpoint, max_batch=4, max_queue=0, max_tokens_cap=64) as (state, server):
        slow_down_engine(state, monkeypatch, 0.1)  # each row would hold its slot for over 6 s
        body = {"model": MODEL, "prompt": ["busy", "also busy"], "n": 2, "max_tokens": 64, "temperature": 0,
                "stop": ["never-appears-here"]}
        with pytest.raises(httpx.ReadTimeout):
            post_json(server, "/v1/completions", body, timeout=0.5)
        assert wait_until(lambda: state.engine.in_flight == 0, timeout=2.0) is not None  # all four rows freed
        with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # one chunk, then hang up
        assert wait_until(lambda: state.engine.in_flight == 0, timeout=2.0) is not None
        out = _complete(server, **{**body, "max_tokens": 2})  # all four admitted again, not 429
        assert len(out["choices"]) == 4 and out["usage"]["completion_tokens"] == 8

"""The serving engine with speculative rounds (`Engine(speculate=N)`, `loramix serve --speculate N`): the same
answers as the plain engine and as `generate` alone, one event per verified token, rows that end mid-round and
rows that join a running group."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest
import torch
from helpers import tiny_tokenizer, tiny_xlora

from loramix.config import GateOptions
from loramix.engine.params import SamplingParams
from loramix.serving.scheduler import Engine, Event, Request
from loramix.serving.settings import ServeSettings

EOS = 2


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_xlora("llama", tmp_path_factory.mktemp("experts"), xlora_depth=2, xlora_size=16,
                      layerwise_scalings=True)[2]


@dataclass
class Outcome:
    texts: list[str] = field(default_factory=list)
    reason: str | None = None
    first: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def emit(self, event: Event) -> None:
        assert event.error is None, event.error
        self.texts.append(event.text)
        self.first.set()
        if event.finish_reason is not None:
            self.reason = event.finish_reason
            self.done.set()


def submit(engine: Engine, tok, prompt: str, params: SamplingParams) -> Outcome:
    outcome = Outcome()
    engine.submit(Request(prompt_ids=tok(prompt)["input_ids"], params=params, gate=GateOptions(), emit=outcome.emit))
    return outcome


def serve(model, tok, jobs, speculate: int) -> tuple[list[Outcome], dict]:
    """Every job queued before the engine admits any (they share steps); their outcomes and the engine's stats."""
    engine = Engine(model, tok, [EOS], max_batch=8, speculate=speculate)
    try:
        with engine.lock:
            outcomes = [submit(engine, tok, prompt, params) for prompt, params in jobs]
        assert all(o.done.wait(60) for o in outcomes)
    finally:
        engine.shutdown()
    return outcomes, engine.stats


def generate_alone(model, tok, prompt: str, params: SamplingParams) -> str:
    ids = torch.tensor([tok(prompt)["input_ids"]])
    result = model.generate(ids, max_new_tokens=params.max_new_tokens, min_new_tokens=params.min_new_tokens,
                            repetition_penalty=params.repetition_penalty, stop=params.stop, tokenizer=tok,
                            eos_token_id=EOS, return_scalings=True)
    return result.texts[0]


def test_served_answers_equal_the_plain_engine_and_generate(model):
    tok = tiny_tokenizer()
    free = generate_alone(model, tok, "abc", SamplingParams(max_new_tokens=30))
    jobs = [("hello world", SamplingParams(max_new_tokens=40)),
            ("abc", SamplingParams(max_new_tokens=30, stop=[free[9:11]])),  # ends on a stop string, mid-round
            ("a longer prompt, left-padded less", SamplingParams(max_new_tokens=7)),  # its budget ends mid-round
            ("xyz", SamplingParams(max_new_tokens=25, repetition_penalty=1.5, min_new_tokens=3))]
    plain, _ = serve(model, tok, jobs, speculate=0)
    fast, stats = serve(model, tok, jobs, speculate=4)
    assert stats["max_rows_in_step"] == len(jobs)
    assert stats["steps"] < sum(len(o.texts) for o in fast) - len(jobs)  # rounds gave more than a token a row
    for (prompt, params), a, b in zip(jobs, plain, fast):
        assert ("".join(b.texts), b.reason) == ("".join(a.texts), a.reason) == \
            (generate_alone(model, tok, prompt, params), a.reason)
        assert len(b.texts) == len(a.texts)  # an event per verified token
    assert fast[1].reason == "stop" and fast[2].reason == "length"


def test_a_row_joins_a_running_speculative_group(model):
    tok = tiny_tokenizer()
    first, second = ("hello world", SamplingParams(max_new_tokens=60)), ("xyz", SamplingParams(max_new_tokens=20))
    engine = Engine(model, tok, [EOS], max_batch=8, speculate=3)
    try:
        a = submit(engine, tok, *first)
        assert a.first.wait(30)
        b = submit(engine, tok, *second)  # merged into the running group, whose mask has holes by now
        assert a.done.wait(60) and b.done.wait(60)
    finally:
        engine.shutdown()
    assert engine.stats["max_rows_in_step"] == 2
    assert "".join(a.texts) == generate_alone(model, tok, *first)
    assert "".join(b.texts) == generate_alone(model, tok, *second)


def test_sampled_answers_are_reproducible_under_a_seed(model):
    tok = tiny_tokenizer()
    jobs = [("hello", SamplingParams(max_new_tokens=20, do_sample=True, temperature=1.2, seed=4))] * 2
    one, _ = serve(model, tok, jobs, speculate=3)
    two, _ = serve(model, tok, jobs, speculate=3)
    assert ["".join(o.texts) for o in one] == ["".join(o.texts) for o in two]


def test_the_flag_is_checked():
    assert ServeSettings(model="m", speculate=4).speculate == 4
    with pytest.raises(ValueError, match="--speculate"):
        ServeSettings(model="m", speculate=-1)


def test_served_log_probabilities_are_the_verified_ones(model):
    """A request asking for log-probabilities: each token's, and its alternatives, within 1e-5 of the plain
    engine's (the verification computes them over several positions at once)."""
    tok = tiny_tokenizer()
    got = {}
    for speculate in (0, 4):
        events: list[Event] = []
        done = threading.Event()

        def emit(event: Event, events=events, done=done) -> None:
            events.append(event)
            if event.finish_reason is not None:
                done.set()

        engine = Engine(model, tok, [EOS], max_batch=4, speculate=speculate)
        try:
            engine.submit(Request(prompt_ids=tok("hello world")["input_ids"], params=SamplingParams(max_new_tokens=24),
                                  gate=GateOptions(), emit=emit, logprobs=3))
            assert done.wait(60)
        finally:
            engine.shutdown()
        got[speculate] = [entry for event in events for entry in event.logprobs]
    assert [e.token for e in got[4]] == [e.token for e in got[0]] and len(got[0]) == 24
    for fast, plain in zip(got[4], got[0]):
        assert abs(fast.logprob - plain.logprob) < 1e-5
        assert [t for t, _ in fast.top] == [t for t, _ in plain.top]
        assert max(abs(a - b) for (_, a), (_, b) in zip(fast.top, plain.top)) < 1e-5

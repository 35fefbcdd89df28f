"""The continuous-batching engine driven directly (no HTTP): batched answers equal `generate` per request, gate
options stay per request, one row's failure or a failed step harms no other request, and folding is exact."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest
import torch
from helpers import VOCAB, make_experts, tiny_tokenizer, tiny_xlora

from loramix import XLoraConfig, XLoraModel
from loramix.config import GateOptions
from loramix.engine.params import SamplingParams
from loramix.serving.scheduler import Engine, Event, QueueFull, Request

EOS = 2


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_xlora("llama", tmp_path_factory.mktemp("experts"), xlora_depth=2, xlora_size=16,
                      layerwise_scalings=True)[2]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@dataclass
class Outcome:
    texts: list[str] = field(default_factory=list)
    reason: str | None = None
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def emit(self, event: Event) -> None:
        self.texts.append(event.text)
        if event.finish_reason is not None:
            self.reason, self.error = event.finish_reason, event.error
            self.done.set()


def serve(engine: Engine, tok, jobs: list[tuple[str, SamplingParams, GateOptions]]) -> list[Outcome]:
    """Submit all jobs while the engine waits (so they are admitted together and share steps); their outcomes."""
    outcomes = [Outcome() for _ in jobs]
    with engine.lock:  # the engine thread cannot admit anything before every job is queued
        for (prompt, params, gate), outcome in zip(jobs, outcomes):
            engine.submit(Request(prompt_ids=tok(prompt)["input_ids"], params=params, gate=gate, emit=outcome.emit))
    assert all(o.done.wait(60) for o in outcomes)
    return outcomes


def reference(model, tok, prompt: str, params: SamplingParams, gate: GateOptions = GateOptions(),
              **kwargs) -> tuple[str, str]:
    """What `generate` answers for one request alone: (text the server sends, finish reason)."""
    ids = torch.tensor([tok(prompt)["input_ids"]])
    options = dict(top_k_lora=gate.top_k_lora, softmax_temperature=gate.softmax_temperature,
                   freeze_scalings_after=gate.freeze_scalings_after)
    result = model.generate(ids, max_new_tokens=params.max_new_tokens, min_new_tokens=params.min_new_tokens,
                            do_sample=params.do_sample, temperature=params.temperature, top_p=params.top_p,
                            top_k=params.top_k, repetition_penalty=params.repetition_penalty, seed=params.seed,
                            stop=params.stop, tokenizer=tok, eos_token_id=EOS, return_scalings=True,
                            **{k: v for k, v in options.items() if v is not None}, **kwargs)
    n = result.n_new_tokens[0]
    new = result.sequences[0, ids.shape[1]:ids.shape[1] + n].tolist()
    text = tok.decode([t for t in new if t != EOS], skip_special_tokens=True)
    hits = [text.find(s) for s in params.stop if s in text]
    return (text[:min(hits)] if hits else text), result.finish_reasons[0]


def engine_for(model, tok, **kwargs) -> Engine:
    return Engine(model, tok, [EOS], **kwargs)


def test_batched_requests_equal_generate_one_at_a_time(model, tok):
    greedy = SamplingParams(max_new_tokens=12)
    free = reference(model, tok, "abc", greedy)[0]
    jobs = [("hello world", greedy, GateOptions()),
            ("abc", SamplingParams(max_new_tokens=12, stop=[free[4:6]]), GateOptions()),  # ends on a stop string
            ("a longer prompt, left-padded less", SamplingParams(max_new_tokens=9, do_sample=True, temperature=1.3,
                                                                top_p=0.9, top_k=20, seed=3), GateOptions()),
            ("xyz", SamplingParams(max_new_tokens=7, repetition_penalty=1.5, min_new_tokens=3), GateOptions())]
    engine = engine_for(model, tok, max_batch=8)
    try:
        outcomes = serve(engine, tok, jobs)
    finally:
        engine.shutdown()
    assert engine.stats["max_rows_in_step"] == len(jobs)  # they were decoded together
    for (prompt, params, gate), outcome in zip(jobs, outcomes):
        assert (outcome.text, outcome.reason) == reference(model, tok, prompt, params, gate)
    assert outcomes[1].reason == "stop" and len(outcomes[1].text) < len(free)


def test_gate_options_are_per_request_and_never_touch_the_config(model, tok):
    params = SamplingParams(max_new_tokens=10)
    jobs = [("route me", params, GateOptions(top_k_lora=1)), ("route me", params, GateOptions(softmax_temperature=0.3)),
            ("route me", params, GateOptions()), ("route me", params, GateOptions(top_k_lora=2, freeze_scalings_after=1))]
    config = model.config
    engine = engine_for(model, tok, max_batch=8)
    try:
        outcomes = serve(engine, tok, jobs)
    finally:
        engine.shutdown()
    assert model.config is config
    answers = [reference(model, tok, prompt, p, gate) for prompt, p, gate in jobs]
    assert [(o.text, o.reason) for o in outcomes] == answers
    assert len({text for text, _ in answers}) > 1  # the options do change the answer
    # the argument path equals the config path (what the server did before)
    model.set_topk_lora(1)
    try:
        assert reference(model, tok, "route me", params) == answers[0]
    finally:
        model.set_topk_lora(None)


def test_a_tiny_temperature_is_greedy_and_does_not_harm_its_neighbour(model, tok):
    """A temperature of 1e-39 overflowed float32 (logits / T = inf) and failed the whole group."""
    greedy = SamplingParams(max_new_tokens=10)
    tiny = SamplingParams(max_new_tokens=10, do_sample=True, temperature=1e-39, seed=1)
    engine = engine_for(model, tok, max_batch=4)
    try:
        outcomes = serve(engine, tok, [("the cat", greedy, GateOptions()), ("the dog", tiny, GateOptions())])
    finally:
        engine.shutdown()
    assert [o.error for o in outcomes] == [None, None]
    assert (outcomes[0].text, outcomes[0].reason) == reference(model, tok, "the cat", greedy)
    assert (outcomes[1].text, outcomes[1].reason) == reference(model, tok, "the dog", greedy)


class Faulty:
    """The model behind the engine, with a fault: `poison(out, kwargs)` may edit a step's output or raise."""

    def __init__(self, model, poison) -> None:
        self.model, self.poison = model, poison

    def __call__(self, **kwargs):
        out = self.model(**kwargs)
        self.poison(out, kwargs)
        return out

    def __getattr__(self, name):
        return getattr(self.model, name)


def test_a_row_whose_sampling_fails_ends_alone(model, tok):
    """NaN logits for one row: its sampling raises; its neighbour in the same step goes on to the end."""
    long_prompt, short_prompt = "a prompt long enough to tell apart", "hi"

    def poison(out, kwargs):  # decode steps of the row at positions past the short prompt's answer
        if kwargs["input_ids"].shape[1] == 1:
            out.logits[kwargs["position_ids"][:, 0] >= len(long_prompt) + 1] = float("nan")

    sampled = SamplingParams(max_new_tokens=8, do_sample=True, seed=0)
    greedy = SamplingParams(max_new_tokens=8)
    engine = engine_for(Faulty(model, poison), tok, max_batch=4)
    try:
        outcomes = serve(engine, tok, [(long_prompt, sampled, GateOptions()), (short_prompt, greedy, GateOptions())])
    finally:
        engine.shutdown()
    assert engine.stats["max_rows_in_step"] == 2
    assert (outcomes[1].text, outcomes[1].reason) == reference(model, tok, short_prompt, greedy)
    assert outcomes[0].reason == "error" and "sampling failed" in outcomes[0].error
    assert engine.in_flight == 0


def test_a_fault_in_a_step_ends_only_that_steps_requests(model, tok):
    """A test double raises once inside a decode step: the requests of that step end with the error, a request
    in another group and the next request are served normally."""
    fired = []

    def poison(out, kwargs):
        if kwargs["input_ids"].shape[1] == 1 and not fired:
            fired.append(True)
            raise RuntimeError("injected fault")

    params = SamplingParams(max_new_tokens=8)
    engine = engine_for(Faulty(model, poison), tok, max_batch=4)
    try:
        outcomes = serve(engine, tok, [("first", params, GateOptions()), ("second", params, GateOptions()),
                                       ("other group", params, GateOptions(top_k_lora=1))])
        after = serve(engine, tok, [("next one", params, GateOptions())])
    finally:
        engine.shutdown()
    for outcome in outcomes[:2]:
        assert outcome.reason == "error" and outcome.error == "RuntimeError: injected fault"
    assert (outcomes[2].text, outcomes[2].reason) == reference(model, tok, "other group", params,
                                                               GateOptions(top_k_lora=1))
    assert (after[0].text, after[0].reason) == reference(model, tok, "next one", params)
    assert engine.in_flight == 0 and not engine.groups


def test_folded_groups_equal_unfolded_frozen_scalings(model, tok):
    """fold_frozen: a group whose rows share their frozen scalings runs folded and answers as the unfolded
    frozen model; rows with different frozen scalings are not folded."""
    folds = []

    class Spy(Faulty):
        def fold(self, scalings, **kwargs):
            folds.append(scalings)
            return self.model.fold(scalings, **kwargs)

    params = SamplingParams(max_new_tokens=10)
    gate = GateOptions(freeze_scalings_after=2)
    engine = engine_for(Spy(model, lambda out, kwargs: None), tok, max_batch=4, fold_frozen=True)
    try:
        alone = serve(engine, tok, [("fold me", params, gate)])
        assert len(folds) == 1
        pair = serve(engine, tok, [("fold me", params, gate), ("something else", params, gate)])
        assert len(folds) == 1  # different frozen scalings: mixed per token
    finally:
        engine.shutdown()
    expected = reference(model, tok, "fold me", params, gate)
    assert (alone[0].text, alone[0].reason) == expected
    assert (alone[0].text, alone[0].reason) == reference(model, tok, "fold me", params, gate, fold_frozen=True)
    assert [(o.text, o.reason) for o in pair] == [expected, reference(model, tok, "something else", params, gate)]


def test_a_row_joining_a_group_later_freezes_on_its_own_schedule(model, tok):
    """B joins A's running group after A's first token: for a few steps A is frozen and B is not (the scaling pass
    runs for B alone, A keeps its frozen scalings); both answer as `generate` alone."""
    params = SamplingParams(max_new_tokens=10)
    gate = GateOptions(freeze_scalings_after=3)
    late = Outcome()
    first = Outcome()

    def emit_first(event: Event) -> None:  # on A's first token (engine thread), B arrives
        if not first.texts:
            engine.submit(Request(prompt_ids=tok("a later one")["input_ids"], params=params, gate=gate,
                                  emit=late.emit))
        first.emit(event)

    partial_steps = []

    class Spy(Faulty):
        def compute_scalings(self, **kwargs):  # called on its own only when some rows are frozen
            partial_steps.append(kwargs["input_ids"].shape[0])
            return self.model.compute_scalings(**kwargs)

    engine = engine_for(Spy(model, lambda out, kwargs: None), tok, max_batch=4)
    try:
        engine.submit(Request(prompt_ids=tok("early")["input_ids"], params=params, gate=gate, emit=emit_first))
        assert first.done.wait(60) and late.done.wait(60)
    finally:
        engine.shutdown()
    assert engine.stats["max_rows_in_step"] == 2 and 2 in partial_steps
    assert (first.text, first.reason) == reference(model, tok, "early", params, gate)
    assert (late.text, late.reason) == reference(model, tok, "a later one", params, gate)


def test_engine_batches_a_sliding_window_model_exactly(tmp_path):
    """Mistral with a 4-token window: rows joined by padding give what each gives alone."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    base = MistralForCausalLM(MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                            pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=4)).eval()
    model = XLoraModel.from_base(base, XLoraConfig(adapters=make_experts(base, "mistral", tmp_path, 2)))
    tok = tiny_tokenizer()
    engine = Engine(model, tok, [2], max_batch=4)
    prompts = ["hello world again", "abc", "a much longer prompt than the window"]
    texts = {i: [] for i in range(len(prompts))}
    done = [threading.Event() for _ in prompts]

    def emitter(i):
        def emit(event):
            texts[i].append(event.text)
            if event.finish_reason:
                done[i].set()
        return emit

    try:
        for i, p in enumerate(prompts):
            engine.submit(Request(prompt_ids=tok(p)["input_ids"], params=SamplingParams(max_new_tokens=12),
                                  gate=GateOptions(), emit=emitter(i)))
        assert all(d.wait(30) for d in done)
    finally:
        engine.shutdown()
    assert engine.stats["max_rows_in_step"] > 1
    for i, p in enumerate(prompts):
        ids = torch.tensor([tok(p)["input_ids"]])
        sequence = model.generate(ids, max_new_tokens=12, eos_token_id=2)
        new = sequence[0, ids.shape[1]:].tolist()
        new = new[:new.index(2)] if 2 in new else new
        assert "".join(texts[i]) == tok.decode(new, skip_special_tokens=True)
        with torch.no_grad():  # and the cached generation is what a full recomputation predicts
            predicted = model(input_ids=sequence).logits[0, ids.shape[1] - 1:-1].argmax(-1)
        n = len(new)
        assert torch.equal(predicted[:n], sequence[0, ids.shape[1]:ids.shape[1] + n])


def test_a_request_asks_for_its_rows_all_at_once(model, tok):
    """An engine with room for 2 rows refuses 3 rows of one call whole (nothing queued), takes 2."""
    engine = Engine(model, tok, [2], max_batch=1, max_queue=1)
    done = threading.Semaphore(0)

    def request():
        return Request(prompt_ids=[5, 6], params=SamplingParams(max_new_tokens=2), gate=GateOptions(),
                       emit=lambda e: done.release() if e.finish_reason else None)

    try:
        with pytest.raises(QueueFull):
            engine.submit_all([request() for _ in range(3)])
        assert engine.in_flight == 0 and not engine.waiting
        engine.submit_all([request() for _ in range(2)])
        assert done.acquire(timeout=30) and done.acquire(timeout=30)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("limits, named", [
    ({"max_batch": 0}, "max_batch"), ({"max_batch": True}, "max_batch"), ({"max_batch": 2.5}, "max_batch"),
    ({"max_queue": -1}, "max_queue"),
])
def test_bad_limits_are_refused_naming_them(model, tok, limits, named):
    with pytest.raises(ValueError, match=f"^{named} must be at least"):
        Engine(model, tok, [EOS], **limits)


def test_shutdown_ends_running_rows_with_the_typed_shutdown_signal(model, tok, monkeypatch):
    """A row still decoding when the engine stops ends with an "error" event marked `shutdown` (what the server
    answers 503 for); a row that fails on its own is not marked."""
    import time

    from loramix.engine.batch import DecodeBatch

    decode = DecodeBatch.decode
    monkeypatch.setattr(DecodeBatch, "decode", lambda batch: (time.sleep(0.05), decode(batch))[1])
    engine = engine_for(model, tok)
    events: list[Event] = []
    try:
        engine.submit(Request(prompt_ids=[VOCAB * 2], params=SamplingParams(max_new_tokens=2),
                              gate=GateOptions(), emit=events.append))  # no such token: the prefill fails
        engine.submit(Request(prompt_ids=tok("abc")["input_ids"], gate=GateOptions(), emit=events.append,
                              params=SamplingParams(max_new_tokens=100, stop=["never-appears-here"])))
        deadline = time.time() + 30
        while len(events) < 2 and time.time() < deadline:  # the failure, then the second row's first token
            time.sleep(0.01)
    finally:
        engine.shutdown()
    failure, *decoded, last = events
    assert failure.finish_reason == "error" and not failure.shutdown
    assert decoded and all(e.finish_reason is None for e in decoded)
    assert last.finish_reason == "error" and last.shutdown

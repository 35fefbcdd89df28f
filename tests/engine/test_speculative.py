"""Exact self-speculative decoding (engine/speculative.py) against plain decoding (`speculate=0`): the same greedy
tokens on five architectures (both decode paths: hand-written steps and the model's own layers / `base(...)`),
single and left-padded rows, with every decoding rule on; the verified distributions within 1e-5 of the plain
steps'; sampled tokens with the same distribution (chi-square) and reproducible under a seed."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import make_experts, padded_batch, tiny_base, tiny_tokenizer

from loramix import XLoraConfig, XLoraModel
from loramix.config import GateOptions
from loramix.engine.batch import DecodeBatch
from loramix.engine.params import SamplingParams
from loramix.engine.rows import RowState
from loramix.engine.speculative import speculative_round

ARCHS = ["llama", "mistral", "qwen2", "gpt2", "mistral-window"]
CONFIG = dict(layerwise_scalings=True, xlora_depth=2, xlora_size=16)


def base_of(arch: str):
    if arch != "mistral-window":
        return tiny_base(arch)
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)  # a sliding window of 4: the model's own layers and mask functions, a DynamicCache
    return MistralForCausalLM(MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                            pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=4)).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    built = {}
    for arch in ARCHS:
        base = base_of(arch)
        adapters = make_experts(base, "gpt2" if arch == "gpt2" else "llama", tmp_path_factory.mktemp(arch))
        built[arch] = XLoraModel.from_base(copy.deepcopy(base), XLoraConfig(adapters=adapters, **CONFIG))
    return built


def test_the_decode_paths_are_those_named(models):
    assert models["llama"].decodes_by_hand and not models["gpt2"].decodes_by_hand
    assert not models["mistral-window"].decodes_by_hand


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_equal_plain_decoding(arch, models):
    model = models[arch]
    ids, mask = padded_batch()
    options = dict(max_new_tokens=40, eos_token_id=None, return_scalings=True)
    plain = model.generate(ids, mask, **options)
    for n in (1, 3, 8):  # rows accept different lengths: holes (GrowingCache) or shifted rows (transformers caches)
        fast = model.generate(ids, mask, speculate=n, **options)
        assert torch.equal(fast.sequences, plain.sequences), n
        assert torch.allclose(fast.scalings, plain.scalings, atol=1e-5)  # the verified scalings
        assert 0 < fast.speculation.accepted <= fast.speculation.drafted
    start = int((mask[1] == 0).sum())
    alone = model.generate(ids[1:2, start:], speculate=3, max_new_tokens=40, eos_token_id=None)
    assert torch.equal(alone[0], plain.sequences[1, start:])


def test_the_plain_layers_of_a_hand_written_model(models):
    model = models["llama"]
    ids, mask = padded_batch()
    plain = model.generate(ids, mask, max_new_tokens=30, eos_token_id=None)
    model.decodes_by_hand = False  # DynamicCaches through the model's own layers
    try:
        assert torch.equal(model.generate(ids, mask, max_new_tokens=30, eos_token_id=None, speculate=4), plain)
    finally:
        model.decodes_by_hand = True


def test_every_decoding_rule_with_speculation(models):
    """EOS with min_new_tokens, repetition penalty, stop strings, top-k gating and the gate's softmax temperature:
    the same tokens, texts, finish reasons and scalings."""
    model, tok = models["llama"], tiny_tokenizer()
    ids, mask = padded_batch()
    free = model.generate(ids, mask, max_new_tokens=30, eos_token_id=None)
    eos = int(free[0, ids.shape[1] + 5])  # rows end at different steps, some mid-draft
    text = tok.decode(free[2, ids.shape[1] + 12: ids.shape[1] + 14])
    options = dict(max_new_tokens=30, min_new_tokens=3, eos_token_id=eos, pad_token_id=0, repetition_penalty=1.3,
                   stop=[text], tokenizer=tok, top_k_lora=2, softmax_temperature=0.7, return_scalings=True)
    plain = model.generate(ids, mask, **options)
    fast = model.generate(ids, mask, speculate=5, **options)
    assert torch.equal(fast.sequences, plain.sequences)
    assert fast.texts == plain.texts and fast.finish_reasons == plain.finish_reasons
    assert fast.n_new_tokens == plain.n_new_tokens and len(set(plain.n_new_tokens)) > 1
    assert torch.allclose(fast.scalings, plain.scalings, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_verified_distributions_within_1e_5_of_plain_steps(arch, models):
    """Every vocabulary entry's log-probability of every verified position against the plain step's."""
    model = models[arch]
    ids, mask = padded_batch()
    vocab = model.base.config.vocab_size

    def run(speculate: int):
        params = SamplingParams(max_new_tokens=24)
        rows = [RowState.start(ids[r][mask[r].bool()].tolist(), params, device="cpu", owner=r) for r in range(3)]
        batch, got = DecodeBatch(model, GateOptions()), {r: [] for r in range(3)}
        with torch.inference_mode():
            batch.choose(batch.prefill(rows, ids, mask))
            while batch.rows:
                if speculate:
                    steps = speculative_round(batch, speculate, logprobs=vocab)
                else:
                    batch.choose(batch.decode(), logprobs=vocab)
                    steps = [batch_step(batch)]
                ended = set()
                for step in steps:
                    for k, row in enumerate(step.rows):
                        order = step.sampled.top_ids[k].argsort()
                        got[row.owner].append((int(step.tokens[k]), step.sampled.top_logprobs[k][order]))
                        if step.reasons[k] is not None:
                            ended.add(id(row))
                batch.keep([i for i, row in enumerate(batch.rows) if id(row) not in ended])
        return got

    plain, fast = run(0), run(4)
    for r in range(3):
        assert [t for t, _ in fast[r]] == [t for t, _ in plain[r]]
        worst = max(float((a - b).abs().max()) for (_, a), (_, b) in zip(fast[r], plain[r]))
        assert worst < 1e-5, worst


def batch_step(batch):
    from loramix.engine.speculative import chosen

    return chosen(batch)


def test_sampling_matches_plain_decoding_in_distribution(models):
    """Tokens 2-4 of many independently seeded rows (one row per seed): a chi-square test of the speculative
    histogram against the plain one, per position; and a fixed seed gives the same tokens twice. Sharp routing
    (gate softmax temperature 0.1) keeps the frozen-scalings draft far from the verified distribution: keeping every
    draft fails this test (p ~ 1e-78 at the second token)."""
    from scipy.stats import chi2_contingency

    model = models["llama"]
    prompt = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(3)).repeat(600, 1)
    options = dict(max_new_tokens=4, do_sample=True, top_k=6, temperature=1.3, eos_token_id=None,
                   softmax_temperature=0.1)
    plain = model.generate(prompt, seed=0, **options)[:, 6:]
    fast = model.generate(prompt, seed=100_000, speculate=3, **options)[:, 6:]
    for position in (1, 2, 3):
        counts = torch.stack([torch.bincount(x[:, position], minlength=97) for x in (plain, fast)])
        counts = counts[:, counts.sum(0) >= 10]  # bins with enough samples for the test
        assert counts.shape[1] > 3
        assert chi2_contingency(counts.numpy())[1] > 1e-3, position
    again = model.generate(prompt[:8], seed=5, speculate=3, **options)
    assert torch.equal(again, model.generate(prompt[:8], seed=5, speculate=3, **options))


def test_speculate_is_checked(models):
    ids, _ = padded_batch()
    with pytest.raises(ValueError, match="speculate"):
        models["llama"].generate(ids, speculate=-1)
    with pytest.raises(ValueError, match="speculate"):
        models["llama"].generate(ids, speculate=2, freeze_scalings_after=1)


def test_the_acceptance_rule_gives_the_target_distribution():
    """accept_or_resample over drafts drawn from q gives tokens distributed as p, for a q far from p (a rule that
    always kept the draft would give q)."""
    from scipy.stats import chisquare

    from loramix.engine.speculative import accept_or_resample

    p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    q = torch.tensor([0.05, 0.15, 0.3, 0.2, 0.3])
    g = torch.Generator().manual_seed(0)
    drafts = torch.multinomial(q, 20_000, replacement=True, generator=g).tolist()
    counts = torch.bincount(torch.tensor([accept_or_resample(p, q, d, g) for d in drafts]), minlength=5)
    assert counts[4] == 0  # p gives it nothing
    assert chisquare(counts[:4].numpy(), (p[:4] * len(drafts)).numpy())[1] > 1e-3


def test_gamma_grows_shrinks_and_pauses():
    from loramix.engine.speculative import FIRST_GAMMA, PAUSE, adapt

    row = RowState.start([5, 6], SamplingParams(max_new_tokens=50), device="cpu")
    adapt(row, FIRST_GAMMA, cap=6)
    assert row.gamma == 6  # all kept: 2 more, capped
    adapt(row, 2, cap=6)
    assert row.gamma == 2  # what it kept
    adapt(row, 0, cap=6)
    assert row.gamma == 1
    adapt(row, 0, cap=6)
    assert (row.gamma, row.pause) == (0, PAUSE)  # a rejected one-token draft: plain steps for a while


def test_routing_that_changes_every_token_pauses_drafting_and_stays_exact(models):
    model = models["llama"]
    ids, _ = padded_batch()
    options = dict(max_new_tokens=40, eos_token_id=None, softmax_temperature=0.005)  # sharp: drafts fail
    for r in range(3):
        plain = model.generate(ids[r:r + 1], **options)
        fast = model.generate(ids[r:r + 1], speculate=4, return_scalings=True, **options)
        assert torch.equal(fast.sequences, plain)
        # mostly plain steps while paused: drafting one token every step would draft >= 3/4 of the tokens made
        assert fast.speculation.acceptance < 0.5 and fast.speculation.drafted < 0.6 * fast.n_new_tokens[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rows_at_the_end_of_the_context(arch, models):
    """Drafts never go past the context (GPT-2's position table ends there): rows whose budget the context cuts."""
    model = models[arch]
    torch.manual_seed(1)
    ids = torch.randint(3, 97, (2, 110))
    mask = torch.ones_like(ids)
    mask[1, :30] = 0
    plain = model.generate(ids, mask, max_new_tokens=40, eos_token_id=None)
    assert plain.shape[1] == 128  # the context
    assert torch.equal(model.generate(ids, mask, max_new_tokens=40, eos_token_id=None, speculate=8), plain)

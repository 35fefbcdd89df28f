"""`transformers.pipeline("text-generation", model=xlora_model, tokenizer=tok)`: the pipeline drives
`XLoraModel.generate`, and its answers are loramix's own greedy generations."""

from __future__ import annotations

import pytest
from helpers import tiny_tokenizer, tiny_xlora

PROMPTS = ["abc", "a longer prompt"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pipeline_equals_generate_greedy(arch, tmp_path):
    from transformers import pipeline

    _, _, model = tiny_xlora(arch, tmp_path, layerwise_scalings=True)
    tok = tiny_tokenizer()
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    assert model.can_generate() and model.main_input_name == "input_ids"
    assert model.generation_config.eos_token_id == 2  # the base's
    for max_new_tokens in (1, 7):
        answers = pipe(PROMPTS, max_new_tokens=max_new_tokens, do_sample=False, return_tensors=True)
        texts = pipe(PROMPTS, max_new_tokens=max_new_tokens, do_sample=False, return_full_text=False)
        for prompt, answer, text in zip(PROMPTS, answers, texts):
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            expected = model.generate(ids, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)[0]
            assert answer[0]["generated_token_ids"] == expected.tolist()
            new = expected[ids.shape[1]:]
            assert len(new) == max_new_tokens  # the pipeline's max_new_tokens reaches generate
            assert text[0]["generated_text"] == tok.decode(new, skip_special_tokens=True)


def test_pipeline_defaults_reach_generate(tmp_path):
    """Without do_sample the pipeline asks for sampling at temperature 0.7 (its defaults): generate takes them
    (min_new_tokens: no early EOS)."""
    from transformers import pipeline

    _, _, model = tiny_xlora("llama", tmp_path)
    pipe = pipeline("text-generation", model=model, tokenizer=tiny_tokenizer())
    answer = pipe("abc", max_new_tokens=5, min_new_tokens=5, return_tensors=True)[0]["generated_token_ids"]
    assert len(answer) == len(tiny_tokenizer()("abc")["input_ids"]) + 5

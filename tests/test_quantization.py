"""X-LoRA over a bitsandbytes 4-bit / 8-bit base on CPU, against X-LoRA over the dequantized weights.

The base is quantized the way users load it, with transformers' public `BitsAndBytesConfig` passed to
`from_pretrained(quantization_config=...)`, and handed to `XLoraModel.from_base` as a loaded model. The reference
is the same float32 base whose adapted Linear weights are replaced by bitsandbytes' own dequantization of the
packed weights. bitsandbytes has two CPU paths for 4-bit: dequantize then multiply in the compute dtype (training,
or a CPU without AVX512-BF16), which agrees with the reference to float32 rounding (1e-5 on logits of magnitude
~0.4), and, in inference on a CPU with AVX512-BF16, a repacked kernel that multiplies in bf16: that one is held to
bf16's tolerance, 8 steps of its 8-bit mantissa at the logits' largest magnitude (as in test_precision.py). 8-bit (LLM.int8) also rounds its inputs to int8 per row,
so it is compared with a tolerance of that rounding (see its test).
"""

from __future__ import annotations

import pytest
import torch
from helpers import VOCAB, make_experts

from loramix import XLoraConfig, XLoraModel

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes==0.50.2)")

CONFIG = dict(layerwise_scalings=True, xlora_depth=2, xlora_size=16)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("q")
    base = tiny_llama_64()
    base.save_pretrained(str(folder / "base"))
    adapters = make_experts(base, "llama", folder)
    return str(folder / "base"), adapters, folder


def tiny_llama_64():
    """helpers' tiny Llama at hidden size 64: bitsandbytes' CPU 4-bit kernel packs in_features in blocks of 64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()


def load_quantized(path: str, bits: int):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits == 4:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.float32).eval()


def dequantized_copy(path: str, quantized) -> torch.nn.Module:
    """The float32 base with every quantized Linear's weight replaced by bitsandbytes' dequantization of it."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    n = 0
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            dense = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            dense = module.weight.data.float() * module.weight.SCB.float()[:, None] / 127  # row-wise absmax
        else:
            continue
        reference.get_submodule(name.removesuffix(".base_layer")).weight.data.copy_(dense.float())
        n += 1
    assert n == 7 * 2  # q, k, v, o, gate, up, down in both layers
    return reference


def pair(saved, bits: int):
    path, adapters, _ = saved
    quantized = XLoraModel.from_base(load_quantized(path, bits), XLoraConfig(adapters=adapters, **CONFIG))
    reference = XLoraModel.from_base(dequantized_copy(path, quantized.base), XLoraConfig(adapters=adapters, **CONFIG))
    reference.classifier.load_state_dict(quantized.classifier.state_dict())
    return quantized, reference


def no_cache_greedy(model, ids, n):
    seq = ids.clone()
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


@pytest.mark.parametrize("kernel", ["dequantize-matmul", "cpu-bf16"])
def test_4bit_equals_xlora_over_dequantized_weights(saved, ids, kernel):
    quantized, reference = pair(saved, 4)
    if kernel == "dequantize-matmul":
        for module in quantized.base.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    layer = quantized.mixed_layers()[1]
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
    assert layer.lora_A.dtype == torch.float32 and quantized.dtype == torch.float32  # not the packed uint8
    with torch.no_grad():
        ours, theirs = quantized(input_ids=ids), reference(input_ids=ids)
        plain = reference.base(input_ids=ids).logits
    tol = 1e-5 if kernel == "dequantize-matmul" else 8 * 2.0 ** -8 * theirs.logits.abs().max().item()
    assert (theirs.logits - plain).abs().max() > 3 * tol  # the experts matter
    torch.testing.assert_close(ours.logits, theirs.logits, atol=tol, rtol=0)
    torch.testing.assert_close(ours.scalings, theirs.scalings, atol=tol, rtol=0)


def test_4bit_generates_cached_as_uncached_and_frozen_refuses_to_fold(saved):
    quantized, reference = pair(saved, 4)
    prompt = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    cached = quantized.generate(prompt, max_new_tokens=8)
    assert torch.equal(cached, no_cache_greedy(quantized, prompt, 8))
    frozen = quantized.generate(prompt, max_new_tokens=8, freeze_scalings_after=2)
    assert torch.equal(frozen, reference.generate(prompt, max_new_tokens=8, freeze_scalings_after=2))
    with pytest.raises(ValueError, match="quantized.*freeze the scalings without folding"):
        quantized.generate(prompt[:1], max_new_tokens=8, freeze_scalings_after=2, fold_frozen=True)
    assert torch.equal(quantized.generate(prompt, max_new_tokens=8), cached)  # no layer was left folded


def test_4bit_gate_training_reduces_loss_and_round_trips(saved, tmp_path):
    quantized, _ = pair(saved, 4)
    g = torch.Generator().manual_seed(5)
    batch = torch.randint(3, VOCAB, (4, 12), generator=g)
    optimizer = torch.optim.Adam(quantized.classifier.parameters(), lr=3e-2)
    quantized.train()
    losses = []
    for _ in range(6):
        loss = quantized(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    quantized.eval()
    assert losses[-1] < losses[0] - 1e-3, losses
    assert all(p.grad is None for p in quantized.base.parameters() if not p.requires_grad)
    quantized.save_pretrained(str(tmp_path / "xlora"))
    path = saved[0]
    reloaded = XLoraModel.from_pretrained(str(tmp_path / "xlora"), base=load_quantized(path, 4))
    for (k, a), (_, b) in zip(quantized.classifier.state_dict().items(), reloaded.classifier.state_dict().items()):
        assert torch.equal(a, b), k
    with torch.no_grad():
        assert torch.equal(quantized(input_ids=batch).logits, reloaded(input_ids=batch).logits)


def test_8bit_equals_xlora_over_dequantized_weights(saved, ids):
    """LLM.int8 on CPU rounds each input row to int8 (absmax / 127) before the product, and the dequantized
    reference does not: each base product then errs by up to ~|x| |W| / 127 per element, which over two layers
    shows as ~1e-3 on logits of magnitude ~0.4. We allow 5e-3 (a 1% relative error of the largest logit)."""
    quantized, reference = pair(saved, 8)
    assert isinstance(quantized.mixed_layers()[1].base_layer, bnb.nn.Linear8bitLt)
    with torch.no_grad():
        ours, theirs = quantized(input_ids=ids), reference(input_ids=ids)
        plain = reference.base(input_ids=ids).logits
    assert (theirs.logits - plain).abs().max() > 2e-2
    torch.testing.assert_close(ours.logits, theirs.logits, atol=5e-3, rtol=0)


def test_every_model_verb_loads_a_4bit_base_from_its_flag(saved, tmp_path, capsys):
    """`--load-in-4bit` reaches the loader: `loramix generate` on a checkpoint of a float32 base prints what the
    API gives with quantization="4bit", whose adapted layers sit on bitsandbytes' Linear4bit."""
    from helpers import tiny_tokenizer

    from loramix.cli import main

    path, adapters, _ = saved
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(path)
    XLoraModel.from_base(path, XLoraConfig(adapters=adapters, **CONFIG)).save_pretrained(str(tmp_path / "ck"))
    quantized = XLoraModel.from_pretrained(str(tmp_path / "ck"), quantization="4bit")
    linears = [layer.base_layer for layer in quantized.mixed_layers() if not isinstance(layer.base_layer, torch.nn.Embedding)]
    assert linears and all(isinstance(m, bnb.nn.Linear4bit) for m in linears)
    prompt = tokenizer("the cat", return_tensors="pt")["input_ids"]
    expected = quantized.generate(prompt, max_new_tokens=6, eos_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(expected[0, prompt.shape[1]:], skip_special_tokens=True)
    assert main(["generate", "--model", str(tmp_path / "ck"), "--load-in-4bit", "--prompt", "the cat",
                 "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == text + "\n"
    assert main(["generate", "--model", str(tmp_path / "ck"), "--load-in-4bit", "--load-in-8bit", "--prompt",
                 "x"]) == 2  # one or the other

"""Tiny random models, experts and tokenizers made on the spot (offline), for the quickstart, tests, benchmarks."""

from __future__ import annotations

import copy
import os

import torch


def tiny_llama(hidden_size: int = 64, layers: int = 2, vocab_size: int = 128, seed: int = 0,
               intermediate_size: int | None = None, heads: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                         intermediate_size=intermediate_size or 2 * hidden_size, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=2048,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def random_experts(base, folder: str, ranks: list[int], targets="all-linear", seed: int = 0,
                   magnitude: float = 1.0) -> dict[str, str]:
    """Save one PEFT LoRA adapter per rank with random A and B (B is non-zero); returns name -> folder."""
    from peft import LoraConfig, get_peft_model

    adapters = {}
    for i, rank in enumerate(ranks):
        torch.manual_seed(seed + i)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                                              init_lora_weights=False))
        if magnitude != 1.0:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_" in name:
                        p.mul_(magnitude)
        path = os.path.join(folder, f"expert_{i}")
        model.save_pretrained(path)
        adapters[f"expert_{i}"] = path
    return adapters


# a chat template that passes the messages' text through: mistral.rs returns token ids only for chat requests
PASS_THROUGH_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def byte_level_tokenizer(vocab_size: int, eos_outside: bool = False):
    """An offline fast tokenizer that mistral.rs can read from tokenizer.json (its token trie needs a byte-level
    decoder): `<pad>` 0, `<s>` 1, `</s>` 2, then byte-level characters (one byte each) and pairs of them up to the
    vocabulary. `eos_outside` puts `</s>` at id `vocab_size` instead, where a model of that vocabulary can never
    produce it (every generation then runs its full length). Chat template: the messages' text passed through.
    Text is split per character without byte-level mapping, so a character outside the byte-level alphabet (a
    space, written 'Ġ' there) is unknown (`<pad>`): enough for the offline checks that use it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = {"<pad>": 0, "<s>": 1, **({} if eos_outside else {"</s>": 2})}
    if not isinstance(vocab_size, int) or vocab_size <= len(specials):
        raise ValueError(f"vocab_size: got {vocab_size!r}, expected an integer > {len(specials)} (the special tokens)")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pieces = (alphabet + [a + b for a in alphabet for b in alphabet])[: vocab_size - len(specials)]
    vocab = {**specials, **{p: i + len(specials) for i, p in enumerate(pieces)}}
    if eos_outside:
        vocab["</s>"] = vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = PASS_THROUGH_TEMPLATE
    return tokenizer

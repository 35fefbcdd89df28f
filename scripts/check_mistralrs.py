"""Export a tiny random X-LoRA with `loramix export --to mistralrs` and check that mistral.rs generates the same
greedy tokens as loramix.

    python -m venv --system-site-packages /work/venvs/mistralrs
    /work/venvs/mistralrs/bin/pip install mistralrs==0.9.5
    PYTHONPATH=src /work/venvs/mistralrs/bin/python scripts/check_mistralrs.py [--tokens 32]

Offline throughout (HF_HUB_OFFLINE=1, token_source "none"). mistral.rs's Python API returns token ids only in the
log-probabilities of chat requests, so the tokenizer gets a pass-through chat template. Known limit of mistral.rs
0.9.5 on CPU: its X-LoRA Llama fails on prompts longer than one token ("RoPE positions length 1 does not match
token count N"), so the prompt is one token. Its CPU KV cache defaults to f16; MISTRALRS_CPU_KV_F32=1 is set
here so that both engines decode in float32. Exit status 0 when the tokens agree.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MISTRALRS_CPU_KV_F32", "1")

ISSUE_14_EXPERTS = [(4, 8, ["q_proj", "v_proj", "down_proj"], {})] * 2  # (rank, alpha, targets, LoraConfig extras)


def compare_greedy(work: str, tokens: int, prompt: str = "a", experts=ISSUE_14_EXPERTS,
                   **xlora_config) -> tuple[list[int], list[int]]:
    """Export a tiny X-LoRA (Llama, hidden 64, 2 layers; by default two rank-4 experts on q/v/down and a layerwise
    gate) into `work`; return the greedy tokens of loramix and of mistral.rs after the one-token `prompt`."""
    import copy

    import torch
    from mistralrs import Architecture, ChatCompletionRequest, Runner, Which
    from peft import LoraConfig, get_peft_model

    from loramix import XLoraConfig, XLoraModel
    from loramix.interop.export import export
    from loramix.interop.mistralrs import ORDERING_NAME
    from loramix.tiny import byte_level_tokenizer, tiny_llama

    base = tiny_llama(hidden_size=64, layers=2, vocab_size=128, seed=0)
    adapters = {}
    for i, (rank, alpha, targets, extra) in enumerate(experts):
        torch.manual_seed(i)
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                                                   init_lora_weights=False, **extra))
        with torch.no_grad():  # large enough updates to move the tokens
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.mul_(3.0)
        adapters[f"expert_{i}"] = os.path.join(work, "experts", f"expert_{i}")
        peft_model.save_pretrained(adapters[f"expert_{i}"])
    config = XLoraConfig(adapters=adapters, **{"layerwise_scalings": True, **xlora_config})
    model = XLoraModel.from_base(base, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.normal_(0, 0.5)
    tokenizer = byte_level_tokenizer(128)
    folder = export(model, "mistralrs", os.path.join(work, "mistralrs"), tokenizer=tokenizer)

    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids.shape[1] != 1:
        raise ValueError(f"prompt {prompt!r} is {ids.shape[1]} tokens; mistral.rs 0.9.5's CPU X-LoRA needs one")
    ours = model.generate(ids, max_new_tokens=tokens, do_sample=False, eos_token_id=None)[0, 1:].tolist()

    base_dir = os.path.join(folder, "base")
    runner = Runner(which=Which.XLora(xlora_model_id=folder, order=os.path.join(folder, ORDERING_NAME),
                                      model_id=base_dir, arch=Architecture.Llama,
                                      tokenizer_json=os.path.join(base_dir, "tokenizer.json")),
                    token_source="none")
    response = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": prompt}], model="xlora", max_tokens=tokens,
        temperature=0.0, logprobs=True, top_logprobs=1))
    theirs = [entry.top_logprobs[0].token for entry in response.choices[0].logprobs.content]
    return ours, theirs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens to generate")
    parser.add_argument("--prompt", default="a", help="one character: one token (see the limit above)")
    parser.add_argument("--out", help="export folder (default: a temporary one)")
    args = parser.parse_args()
    work = args.out or tempfile.mkdtemp(prefix="loramix-mistralrs-")
    ours, theirs = compare_greedy(work, args.tokens, args.prompt)
    print(f"exported to {os.path.join(work, 'mistralrs')}")
    print(f"loramix   : {ours}")
    print(f"mistral.rs: {theirs}")
    same = ours == theirs
    print(f"{'SAME' if same else 'DIFFERENT'} greedy tokens ({len(ours)} from loramix, {len(theirs)} from mistral.rs)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

"""The decode engine: token ids in, token ids out. It knows no tokenizer beyond the text rule its callers hand it.

- `params`: what a row asks for (`SamplingParams`, `GateOptions`), each checked once;
- `sampling`: the next token of every row, and log-probabilities;
- `rows`: one sequence being decoded and the rules of its end (budget, finish reason);
- `batch`: `DecodeBatch`, rows decoded together with one KV cache per pass (prefill, decode, keep, merge);
- `generate`: `generate` / `decode_steps`, the core driven over one batch of prompts.
"""

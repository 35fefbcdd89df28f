"""The decode engine: token ids in, token ids out. It knows no tokenizer beyond the text rule its callers hand it.

- `params`: how a row picks its tokens (`SamplingParams`, checked once; the gate's options are
  `loramix.config.GateOptions`);
- `sampling`: the next token of every row, and log-probabilities;
- `rows`: one sequence being decoded and the rules of its end (budget, finish reason);
- `text`: the text rule, generated ids to text (against the prompt's tail; EOS, stop strings, hold-back);
- `batch`: `DecodeBatch`, rows decoded together with one KV cache per pass (prefill, decode, keep, merge);
- `generate`: `generate` / `decode_steps`, the core driven over one batch of prompts;
- `speculative`: exact self-speculative decoding (drafts with frozen scalings, verified through both passes).
"""

"""The base model's side: what differs between transformers releases (`compat`), the decoder stack of a
Llama-family base run layer by layer for both passes (`decoder`), and the KV cache that grows in place
(`kv_cache`)."""

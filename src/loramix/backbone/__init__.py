"""The base model as both passes of X-LoRA run it.

- `compat`: what differs between transformers releases, found through public surfaces;
- `decoder`: the decoder stack of a Llama-family base run layer by layer, with a hand-written one-token step;
- `kv_cache`: `GrowingCache`, a KV cache that grows in place.
"""

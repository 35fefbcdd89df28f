"""Formats other tools read.

- `export`: an X-LoRA with fixed expert weights as one plain PEFT LoRA adapter, or as a merged model; its `export`
  hands each of the three formats to its writer;
- `mistralrs`: the X-LoRA layout of mistral.rs (a Rust inference engine), written and read;
- `saving`: what `export` and `mistralrs` write through (a new output folder, the plain base model).
"""

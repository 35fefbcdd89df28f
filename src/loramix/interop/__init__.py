"""Formats other tools read: a plain PEFT LoRA or a merged model with fixed expert weights (`export`), and the
X-LoRA layout of mistral.rs, written and read (`mistralrs`)."""

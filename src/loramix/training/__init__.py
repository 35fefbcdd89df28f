"""Training LoRA experts or the X-LoRA gate, one loop for both.

- `loop`: `train_expert`, `train_xlora` and the loop they share;
- `settings`: `TrainingArgs` (the loop's settings), `LoraSettings` (an expert's adapter);
- `data`: `DataSource`s, rows from files or datasets, tokenized with loss masks, planned into batches;
- `checkpoints`: atomic `checkpoint-<step>/` folders, metric logs;
- `distributed`: data parallelism (the process group, the gradient sums).
"""

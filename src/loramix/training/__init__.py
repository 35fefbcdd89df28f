"""Training the experts and the gate: the loop (`loop`), the data (`data`), checkpoints on disk
(`checkpoints`) and data parallelism (`distributed`)."""

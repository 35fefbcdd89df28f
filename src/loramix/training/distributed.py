"""Data parallelism for training: the process group of a `torchrun` / `accelerate launch` run, and the sums.

With WORLD_SIZE > 1 the process group is initialised (NCCL on GPUs, gloo on CPUs) and the trainer sums the
trainable gradients with one all-reduce per step. Only the trainable parameters travel (the gate is small), so no
DDP bucket overlap is needed. With one process every call is a no-op.
"""

from __future__ import annotations

import os

import torch


class Distributed:
    """This process's place in the run (rank, world size, local device) and the collective calls the loop uses."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.started_here = False
        if self.world > 1:
            for var in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
                if os.environ.get(var, "false").lower() == "true":
                    raise NotImplementedError(f"{var}: loramix trains with data parallelism only (DDP-style "
                                              f"gradient all-reduce); FSDP and DeepSpeed are not implemented")
            if not torch.distributed.is_initialized():
                backend = "nccl" if torch.cuda.is_available() else "gloo"
                torch.distributed.init_process_group(backend)
                self.started_here = True
        self.rank = torch.distributed.get_rank() if self.world > 1 else 0
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files and logs."""
        return self.rank == 0

    def device(self, requested: str | None) -> torch.device:
        """`requested`, else cuda:LOCAL_RANK when CUDA is available, else the CPU."""
        if requested:
            return torch.device(requested)
        return torch.device(f"cuda:{self.local_rank}") if torch.cuda.is_available() else torch.device("cpu")

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over all processes, in place; returns it."""
        if self.world > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        """Tear the process group down if this object started it."""
        if self.started_here:
            torch.distributed.destroy_process_group()

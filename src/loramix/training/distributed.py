"""The process group of a `torchrun` / `accelerate launch` run, and the collective calls the loop makes.

With WORLD_SIZE > 1 the process group is initialised (NCCL on GPUs, gloo on CPUs). By default each process holds
the whole model and the trainer sums the trainable gradients with one all-reduce per step (data parallelism: only
the trainable parameters travel, the gate is small, so no DDP bucket overlap is needed). With `--fsdp` (or
`accelerate launch` with an FSDP config, ACCELERATE_USE_FSDP=true) the model is sharded over the processes
instead (training/fsdp.py) on the one-dimensional device mesh `mesh()` gives. With one process every call is a
no-op.
"""

from __future__ import annotations

import os

import torch


class Distributed:
    """This process's place in the run (rank, world size, local device) and the collective calls the loop uses."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.started_here = False
        # `accelerate launch --use_fsdp` (or a config with distributed_type: FSDP) asks for sharding
        self.accelerate_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        if self.world > 1:
            if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
                raise NotImplementedError("ACCELERATE_USE_DEEPSPEED: loramix trains with data parallelism or FSDP "
                                          "(--fsdp); DeepSpeed is not implemented")
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

    def shards(self, fsdp: bool) -> bool:
        """Whether this run shards its model: FSDP asked for (the flag or accelerate's config) and more than one
        process to shard over."""
        return (fsdp or self.accelerate_fsdp) and self.world > 1

    def device(self, requested: str | None) -> torch.device:
        """`requested`, else cuda:LOCAL_RANK when CUDA is available, else the CPU."""
        if requested:
            return torch.device(requested)
        return torch.device(f"cuda:{self.local_rank}") if torch.cuda.is_available() else torch.device("cpu")

    def mesh(self, device: torch.device):
        """The one-dimensional device mesh of all processes, on `device`'s type (its CUDA device made current)."""
        from torch.distributed.device_mesh import init_device_mesh

        if device.type == "cuda":
            torch.cuda.set_device(device)
        return init_device_mesh(device.type, (self.world,))

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over all processes, in place; returns it."""
        if self.world > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """The main process's `tensor` on every process (a CPU tensor in, a CPU tensor out)."""
        if self.world == 1:
            return tensor
        on = tensor.cuda() if torch.distributed.get_backend() == "nccl" else tensor
        torch.distributed.broadcast(on, src=0)
        return on.cpu()

    def gather_ints(self, value: int) -> list[int]:
        """`value` of every process, by rank."""
        if self.world == 1:
            return [value]
        backend_device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        out = [torch.zeros((), dtype=torch.int64, device=backend_device) for _ in range(self.world)]
        torch.distributed.all_gather(out, torch.tensor(value, dtype=torch.int64, device=backend_device))
        return [int(t) for t in out]

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        """Tear the process group down if this object started it."""
        if self.started_here:
            torch.distributed.destroy_process_group()

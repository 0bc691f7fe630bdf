"""Data parallelism: one process per device, started by torchrun or by SLURM (one task per GPU).

Each rank reads its own share of the token stream and trains the same SAE. After every backward the
gradients are summed over ranks, each weighted by its share of the global batch's rows, so every rank holds
the gradient of the loss over the global batch and takes the same Adam step. Rank 0 alone writes the run
directory, prints and logs to wandb.

The process group is the one source of truth: `rank()`, `world_size()` and `is_main()` read it, and with no
process group (one process: today's code path) they say rank 0 of 1 and every collective below is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

TIMEOUT = timedelta(minutes=30)
"""How long a collective waits for a rank that does not come: long enough for what the others wait on (model
loading at the start, rank 0's checkpoints and evaluations), short enough that a rank that died without its
peers noticing does not hold the job's GPUs for hours."""


class PeerFailed(RuntimeError):
    """Rank 0 stopped on an error (reported there) before the other ranks could go on."""


@dataclass(frozen=True)
class Launch:
    """This process's place in the job, as its environment describes it."""

    rank: int
    world_size: int
    local_rank: int
    """The device index on this node (cuda:local_rank)."""
    master_addr: str
    master_port: str


SINGLE = Launch(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port="0")


def launch_from_env(env: Mapping[str, str] = os.environ) -> Launch:
    """torchrun's variables; else those of a SLURM job step (`srun`) of several tasks; else a single process.

    A SLURM batch script runs once however many tasks it asked for, and has no SLURM_STEP_NUM_TASKS: it is a
    single process (it should `srun` the command, or start torchrun, to get several).
    """
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, or anyone who sets the standard variables
        return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")),
                      env.get("MASTER_ADDR", "127.0.0.1"), env.get("MASTER_PORT", "29500"))
    n_tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1"))
    if n_tasks > 1:
        nodes = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
        # Every task derives the same address and port: the first node of the step, a port from the job id.
        port = env.get("MASTER_PORT") or str(20_000 + int(env["SLURM_JOB_ID"]) % 20_000)
        return Launch(int(env["SLURM_PROCID"]), n_tasks, int(env.get("SLURM_LOCALID", "0")),
                      env.get("MASTER_ADDR") or first_host(nodes), port)
    return SINGLE


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list ("gpu[07-09],cpu01" -> "gpu07"), expanded by `scontrol`."""
    if "[" not in nodelist:
        return nodelist.split(",")[0]
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"cannot expand the SLURM node list {nodelist!r} with scontrol ({e}); set MASTER_ADDR") from None
    return out.stdout.split()[0]


@contextlib.contextmanager
def process_group(device: str) -> Iterator[Launch]:
    """Join the job's process group for the duration, if the environment says there are several processes
    (and none was set up by the caller, who then also tears it down). nccl on cuda (each rank on its local
    device), gloo otherwise."""
    launch = launch_from_env()
    if launch.world_size == 1 or dist.is_initialized():
        yield launch
        return
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:  # so that device="cuda" means this rank's GPU; a task that sees only its own GPU has index 0
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    # env:// reads these; under torchrun they are set already (and point at its agent's store).
    for key, value in (("RANK", launch.rank), ("WORLD_SIZE", launch.world_size), ("LOCAL_RANK", launch.local_rank),
                       ("MASTER_ADDR", launch.master_addr), ("MASTER_PORT", launch.master_port)):
        os.environ.setdefault(key, str(value))
    _bind_world_defaults_before_init()
    dist.init_process_group("nccl" if on_cuda else "gloo", timeout=TIMEOUT)
    try:
        yield launch
    finally:
        dist.destroy_process_group()


def _bind_world_defaults_before_init() -> None:
    """Import torch.distributed.nn.functional while no process group exists.

    Its functions take `group=group.WORLD` as a default argument, and Python evaluates that once, when the
    module is first imported. Imported while a group is live, those defaults hold the live group. Training
    would import it then: Adam's first step imports torch._dynamo, which imports this module. Held that way,
    destroy_process_group cannot free the group: its gloo threads and sockets would live on until interpreter
    shutdown tore them down, and a rank could then abort ("terminate called without an active exception").
    Imported first, the defaults are None, which means the default group whenever one is called."""
    import torch.distributed.nn.functional  # noqa: F401


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """The process that writes files, prints and logs."""
    return rank() == 0


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of `tensor` (which may be reduced in place), on its device."""
    if world_size() == 1:
        return tensor
    buffer = tensor.to(_comm_device())
    dist.all_reduce(buffer)
    return buffer.to(tensor.device)


def sum_gradients_(parameters: Iterable[torch.nn.Parameter], weight: float) -> None:
    """Replace each gradient by the sum over ranks of `weight` x gradient. With weight = this rank's rows / the
    global batch's rows, every rank ends with the gradient of the loss's mean over the global batch."""
    if world_size() == 1:
        return
    for p in parameters:
        grad = torch.zeros_like(p) if p.grad is None else p.grad.contiguous()  # collectives need dense storage
        grad.mul_(weight)
        dist.all_reduce(grad)
        p.grad = grad


@torch.no_grad()
def broadcast_module_(module: torch.nn.Module) -> None:
    """Overwrite every parameter and buffer with rank 0's, so that all ranks start from the same model."""
    if world_size() == 1:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        buffer = tensor.data.to(_comm_device())
        dist.broadcast(buffer, src=0)
        tensor.data.copy_(buffer)


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank (pickled between our own processes only)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


def gather_to_main(obj: T) -> list[T] | None:
    """Every rank's `obj`, in rank order, on rank 0; None elsewhere. Keep tensors in it on the CPU."""
    if world_size() == 1:
        return [obj]
    gathered: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and hand its result to every rank. If it raises there, the other ranks raise
    PeerFailed with its message instead of waiting for rank 0 at their next collective."""
    if world_size() == 1:
        return fn()
    result: Any = None
    error: BaseException | None = None
    if is_main():
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the peers, then re-raised
            error = e
    result, message = broadcast_object((result, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if message is not None:
        raise PeerFailed(f"rank 0 stopped: {message}")
    return result

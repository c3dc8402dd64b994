"""Running under torchrun: who this process is, and the few collectives the steps need.

Why: past one process the project uses torch.distributed as launched by `torchrun` (or Slurm's `srun`
setting the same variables), never a scheduler of its own. A step reads RANK, WORLD_SIZE and LOCAL_RANK
from the environment (torchrun's env:// contract); with a world of one nothing here talks to anything, so
every step runs unchanged in one process. Work is divided by whole units (chunk-aligned ranges of
sequences, or whole SAEs) that each rank computes exactly as one process would, which is what makes a
distributed result equal to a single-process one.

Errors: a rank that fails alone would leave the others waiting in a collective. Steps therefore pass the
fallible phases (option checks, creating the store) through `agreed`, which tells every rank the first
failure, so each prints the same one-line error and exits; a failure inside the main loop ends the
process, and torchrun stops the other ranks.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from actstore.errors import ActstoreError, StoreError, UsageError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks a launcher started."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def single(self) -> bool:
        return self.size == 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def mine(self, items: Sequence[T]) -> list[T]:
        """This rank's share of `items`, dealt round-robin (every rank computes the same list)."""
        return list(items[self.rank :: self.size])


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise UsageError(
            f"{name}={text!r} is not a whole number; launch with torchrun or set it to an integer"
        ) from None


def world() -> World:
    """The world torchrun (or srun) described in the environment; one process when nothing is set."""
    size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if size < 1 or not 0 <= rank < size:
        raise UsageError(f"RANK={rank} and WORLD_SIZE={size} do not describe a rank; check the launcher's variables")
    return World(rank, size, _env_int("LOCAL_RANK", rank))


def init(device: str) -> World:
    """Join the process group (gloo for the CPU, NCCL for CUDA) when there is more than one rank."""
    w = world()
    if w.single or _initialised():
        return w
    import torch.distributed as dist

    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise UsageError(
            f"WORLD_SIZE={w.size} but MASTER_ADDR/MASTER_PORT are not set; launch with torchrun "
            "(or set them as torchrun would)"
        )
    backend = "nccl" if device.startswith("cuda") else "gloo"
    timeout = datetime.timedelta(seconds=float(os.environ.get("ACTSTORE_DIST_TIMEOUT", 1800)))
    dist.init_process_group(backend, rank=w.rank, world_size=w.size, timeout=timeout)
    return w


def _initialised() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank_device(device: str, w: World) -> str:
    """`cuda` means this rank's own GPU (LOCAL_RANK) when several ranks share a node; an explicit
    `cuda:N` or `cpu` is kept."""
    if device == "cuda" and not w.single:
        return f"cuda:{w.local_rank}"
    return device


def gather(value: Any, w: World) -> list[Any]:
    """Every rank's `value` (picklable), in rank order, on every rank."""
    if w.single:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * w.size
    dist.all_gather_object(out, value)
    return out


def broadcast(value: Any, w: World) -> Any:
    """Rank 0's `value` on every rank."""
    if w.single:
        return value
    import torch.distributed as dist

    box = [value if w.leader else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(w: World) -> None:
    if not w.single:
        import torch.distributed as dist

        dist.barrier()


def all_sum(t: torch.Tensor, w: World) -> torch.Tensor:
    """`t` summed over the ranks, in place (a no-op alone)."""
    if not w.single:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def agreed(step: Callable[[], T], w: World, leader_only: bool = False) -> T | None:
    """Run `step` (on rank 0 only with `leader_only`), then raise on every rank the first rank's user error.

    Why: the ranks must fail together with the same one-line message, not hang in the next collective."""
    error: tuple[str, str] | None = None
    result = None
    if w.leader or not leader_only:
        try:
            result = step()
        except ActstoreError as exc:
            if w.single:
                raise
            error = (type(exc).__name__, str(exc))
    if w.single:
        return result
    errors = [e for e in gather(error, w) if e is not None]
    if errors:
        kind, message = errors[0]
        raise (UsageError if kind == "UsageError" else StoreError)(message)
    return result


def same_everywhere(what: dict[str, Any], w: World, command: str) -> None:
    """A one-line error on every rank when the ranks were given different options (a launcher passing
    per-rank arguments, or nodes with different command lines)."""
    if w.single:
        return
    every = gather(what, w)
    for rank, theirs in enumerate(every):
        if theirs != every[0]:
            diff = sorted(k for k in set(theirs) | set(every[0]) if theirs.get(k) != every[0].get(k))
            raise UsageError(
                f"`{command}` was started with different options on rank 0 and rank {rank} ({', '.join(diff)}); "
                "give every rank the same command line"
            )


def check_world_fits(units: int, w: World, what: str) -> None:
    """A world larger than the work's units would leave ranks idle forever: refuse it with the number."""
    if w.size > units:
        raise UsageError(
            f"{w.size} processes but only {units} {what}; start at most {units} processes "
            "(torchrun --nproc-per-node) or give each more work units"
        )


def finish(w: World) -> None:
    """Leave the process group cleanly (a destroyed group lets a later step in this process start anew)."""
    if not w.single and _initialised():
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()

"""Process-group helpers: launcher environment, single-process defaults, and rank-aware collectives.

A run is either launched (``deepspeed`` launcher or ``torchrun``: ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
``MASTER_ADDR``/``MASTER_PORT`` set in the environment) or standalone, in which case
:func:`ensure_single_process_env` fills in a one-process world on 127.0.0.1 (without these variables
DeepSpeed falls back to MPI discovery and fails). Every collective here is a no-op without a process group.
"""

import os
import socket
import sys
from typing import Any

import torch
import torch.distributed as dist

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched() -> bool:
    """True when a launcher set ``RANK`` and ``WORLD_SIZE``."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def ensure_single_process_env() -> None:
    """Set the launch variables of a one-process world (rank 0 of 1 on 127.0.0.1) unless launched."""
    if launched():
        os.environ.setdefault("LOCAL_RANK", "0")
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(find_free_port()))
    os.environ["RANK"] = "0"
    os.environ["WORLD_SIZE"] = "1"
    os.environ["LOCAL_RANK"] = "0"


def strip_local_rank_arg(argv: list[str] | None = None) -> list[str]:
    """Remove the ``--local_rank=N`` / ``--local_rank N`` the deepspeed launcher appends; export it as LOCAL_RANK.

    For command lines such as ``herd run`` that do not declare the flag: call it on ``sys.argv[1:]``
    before parsing. Returns the remaining arguments (``sys.argv[1:]`` when ``argv`` is None).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a.startswith("--local_rank=") or a.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(args):
            os.environ.setdefault("LOCAL_RANK", args[i + 1])
            i += 1
        else:
            out.append(a)
        i += 1
    return out


def env_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the environment (0, 1, 0 when unset)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else env_world()[0]


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_rank0() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (no-op with one process); returns ``t``."""
    if is_initialized() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (picklable objects; transport only, nothing is written)."""
    if not (is_initialized() and world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` as a list on rank 0 (None elsewhere); ``[obj]`` with one process."""
    if not (is_initialized() and world_size() > 1):
        return [obj]
    out = [None] * world_size() if rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def init_distributed() -> bool:
    """Join the launcher's process group (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment) if this
    process has not yet; nccl on GPUs, gloo on CPU. Returns True when the group was created here (the
    caller then destroys it at the end); backends started later reuse it."""
    if is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(env_world()[2])
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return True


def exit_without_teardown(code: int = 0) -> None:
    """Leave a finished rank now: flush logs and stdio, then ``os._exit(code)`` (no interpreter teardown).

    gloo/DeepSpeed threads sometimes abort a rank at interpreter exit, after all its work is done ("terminate
    called without an active exception", SIGABRT; ~4% of 2-rank CPU runs, docs/ENVIRONMENT.md), and the
    launcher then reports the whole run as failed. Call only once every engine is closed and every file written.
    """
    import logging
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

"""Data parallelism under ``torchrun`` / ``accelerate launch``: which process this is, and the few collectives.

recoup never starts processes itself: a launcher (``torchrun --nproc-per-node N -m recoup ...`` or
``accelerate launch -m recoup ...``) starts N copies of the same command and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR``/``PORT``. Each copy reads the same data; the
training loop (:func:`recoup.recover.train.train`) gives each rank its slice of every global batch
and all-reduces gradients; evaluation gives each rank a shard of the requests. Rank 0 alone logs,
validates and saves. The process group (``nccl`` for CUDA tensors, ``gloo`` on CPU) is created on the
first collective. Without a launcher every function here is a no-op on one process.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def world_size() -> int:
    """Number of processes in the launched job (1 without a launcher)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (0 without a launcher)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True on rank 0, the one process that logs, validates and saves."""
    return rank() == 0


def setup_process() -> None:
    """At start-up under a launcher: pin this rank's GPU (so ``cuda`` means ``cuda:LOCAL_RANK``) and quiet
    the other ranks' logging to warnings."""
    if world_size() <= 1:
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if not is_main():
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("recoup").setLevel(logging.WARNING)


def ensure_group(device: torch.device | str = "cpu") -> bool:
    """Create the default process group if launched with WORLD_SIZE > 1; True when one exists."""
    if world_size() <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        log.info("data parallel: rank %d of %d (%s)", rank(), world_size(), backend)
    return True


def shard_bounds(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part ``index`` when ``n`` items are cut into ``parts`` contiguous near-equal parts."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def my_slice(n: int) -> slice:
    """This rank's contiguous slice of ``n`` items (all of them on one process)."""
    start, stop = shard_bounds(n, world_size(), rank())
    return slice(start, stop)


def broadcast_(tensors: list[torch.Tensor]) -> None:
    """Overwrite ``tensors`` on every rank with rank 0's values (in place)."""
    if not ensure_group(tensors[0].device if tensors else "cpu"):
        return
    with torch.no_grad():
        for t in tensors:
            buf = t.detach().contiguous()
            dist.broadcast(buf, src=0)
            if buf.data_ptr() != t.data_ptr():
                t.copy_(buf)


def average_gradients_(params: list[torch.Tensor]) -> None:
    """Replace each parameter's gradient by its mean over the ranks (one flat all-reduce; a missing grad is 0)."""
    if not ensure_group(params[0].device if params else "cpu"):
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n


def mean_scalar(value: float, device: torch.device | str = "cpu") -> float:
    """The mean of a float over the ranks (the value itself on one process)."""
    if not ensure_group(device):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def main_decides(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is true on rank 0 (so every rank stops at the same step)."""
    if not ensure_group(device):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj`` (picklable) in rank order, on every rank; ``[obj]`` on one process."""
    if not ensure_group("cuda" if torch.cuda.is_available() else "cpu"):
        return [obj]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def sharded_map(fn, items: list) -> list:
    """``[fn(x) for x in items]`` with each rank computing its contiguous shard of ``items``; every rank gets
    the whole list in the original order (one process: a plain map). ``fn`` must not need other ranks."""
    if world_size() <= 1:
        return [fn(x) for x in items]
    mine = [fn(x) for x in items[my_slice(len(items))]]
    return [y for part in all_gather_objects(mine) for y in part]  # type: ignore[union-attr]

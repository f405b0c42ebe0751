"""Multi-process tests without the launcher: a function run on spawned gloo ranks."""

from __future__ import annotations

import torch.distributed as dist
import torch.multiprocessing as mp


def run_on_gloo_ranks(fn, world: int, store_file: str, *args) -> None:
    """fn(rank, world, *args) on `world` spawned processes of one gloo group; fn must be a module-level
    function (it is pickled by name). A file rendezvous: no free-port race with tests running alongside."""
    mp.spawn(_rank, args=(fn, world, store_file, args), nprocs=world, join=True)


def _rank(rank: int, fn, world: int, store_file: str, args: tuple) -> None:
    from engine.parallel import shutdown_distributed

    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    except BaseException:
        dist.destroy_process_group()  # the peer may never reach a barrier now
        raise
    shutdown_distributed()

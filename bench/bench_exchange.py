#!/usr/bin/env python
"""The gradient exchange of ``ovit.distributed`` on gloo (loopback, this machine): W ranks
(1, 2, 4), each sending its chunks of every layer's gradients to the layer's owner exactly as
``distributed_prune`` does (an agreement, then a gather per layer and chunk), the owners
dropping what they receive. Reports bytes and seconds per gradient over the job.

    python bench/bench_exchange.py            # table + bench/out/bench_exchange.json
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

LAYERS = [1 << 18] * 4  # four layers of 262 144 weights: 4 MiB of float32 gradient per gradient
CHUNK = 16
GRADS = 64


class Drop:
    def update(self, chunk: torch.Tensor) -> None:
        pass


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    from ovit.distributed import Piece, _ToOwners
    from ovit.layers import Layout, PrunableLayer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    owners = [i % world for i in range(len(LAYERS))]
    layers = [PrunableLayer(f"l{i}", None, Layout(n, 64, n // 64, 0)) for i, n in enumerate(LAYERS)]
    sinks = [_ToOwners([(Piece(ly, 0, ly.layout.num_blocks), o)], {f"l{i}[0:{ly.layout.num_blocks}]": Drop()}, None)
             for i, (ly, o) in enumerate(zip(layers, owners))]  # fmt: skip
    chunks = [torch.randn(CHUNK, n) for n in LAYERS]
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(GRADS // world // CHUNK):
        for s, c in zip(sinks, chunks):
            s.update(c)
    dist.barrier()
    sec = time.perf_counter() - t0
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"world": world, "seconds": sec}, f)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    rows = []
    for world in (1, 2, 4):
        path = os.path.join("/tmp", f"ovit_exchange_{world}.json")
        mp.spawn(_worker, args=(world, _port(), path), nprocs=world, join=True)
        with open(path) as f:
            r = json.load(f)
        grads = GRADS // world // CHUNK * CHUNK * world
        per = 4 * sum(LAYERS)
        rows.append({"world": world, "gradients": grads, "bytes_per_gradient": per,
                     "bytes_moved_per_gradient": per * (world - 1) / world,
                     "seconds_per_gradient": r["seconds"] / grads})  # fmt: skip
    print(
        f"gloo on loopback, {os.cpu_count()} CPUs, {len(LAYERS)} layers, {4 * sum(LAYERS) / 2**20:.0f} MiB per gradient"
    )
    print("| ranks | bytes moved per gradient | ms per gradient |")
    print("|---|---|---|")
    for r in rows:
        moved, ms = r["bytes_moved_per_gradient"] / 2**20, 1e3 * r["seconds_per_gradient"]
        print(f"| {r['world']} | {moved:.1f} MiB | {ms:.2f} |")
    os.makedirs(os.path.join(here, "out"), exist_ok=True)
    with open(os.path.join(here, "out", "bench_exchange.json"), "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

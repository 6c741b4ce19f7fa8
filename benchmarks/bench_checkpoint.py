"""Checkpoint throughput: functrain save/load vs torch.save/torch.load, and async blocking time.

Run: ``PYTHONPATH=. python benchmarks/bench_checkpoint.py [--params 100e6 --tensors 25]``.
One run of each, on a temporary folder under /tmp (deleted afterwards). Figures are
ratios against plain PyTorch in the same run; save times include fsync for both.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import tracemalloc

import torch

from functrain.checkpoint import CheckpointManager, load, save


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _torch_save(path: str, tree) -> None:
    with open(path, "wb") as f:
        torch.save(tree, f)
        f.flush()
        os.fsync(f.fileno())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--tensors", type=int, default=25)
    args = parser.parse_args()
    per = int(args.params) // args.tensors
    state = {f"layer{i}.weight": torch.randn(per) for i in range(args.tensors)}
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    mb = nbytes / 1e6
    folder = tempfile.mkdtemp(prefix="functrain-bench-", dir="/tmp")
    try:
        ft_path, pt_path = os.path.join(folder, "ft.msgpack"), os.path.join(folder, "pt.pt")
        t_ft_save, _ = _timed(lambda: save(ft_path, state))
        t_pt_save, _ = _timed(lambda: _torch_save(pt_path, state))
        t_ft_load, loaded = _timed(lambda: load(ft_path, target=state))
        del loaded
        t_pt_load, loaded = _timed(lambda: torch.load(pt_path, weights_only=True))
        del loaded
        tracemalloc.start()
        save(ft_path, state)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()

        mgr_sync = CheckpointManager(os.path.join(folder, "sync"), keep_last=1)
        t_sync, _ = _timed(lambda: mgr_sync.save(state, step=1))
        with CheckpointManager(os.path.join(folder, "async"), keep_last=1, async_save=True) as mgr:
            t_async_block, _ = _timed(lambda: mgr.save(state, step=1))
            t_async_drain, _ = _timed(mgr.wait)

        print(f"state: {args.tensors} float32 tensors, {int(args.params) / 1e6:.0f}M params, {mb:.0f} MB")
        print(f"save  functrain {t_ft_save:6.2f}s ({mb / t_ft_save:7.0f} MB/s)   torch.save {t_pt_save:6.2f}s "
              f"({mb / t_pt_save:7.0f} MB/s)   ratio functrain/torch {t_ft_save / t_pt_save:.2f}x time")
        print(f"load  functrain {t_ft_load:6.2f}s ({mb / t_ft_load:7.0f} MB/s)   torch.load {t_pt_load:6.2f}s "
              f"({mb / t_pt_load:7.0f} MB/s)   ratio functrain/torch {t_ft_load / t_pt_load:.2f}x time")
        print(f"save peak Python-heap (tracemalloc) extra memory: {peak / 1e6:.2f} MB for a {mb:.0f} MB state")
        print(f"manager save: sync {t_sync:.2f}s; async blocks the caller {t_async_block:.2f}s "
              f"(host copy), then writes {t_async_drain:.2f}s in the background")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

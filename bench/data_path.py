"""A GPU node's data path on NIH-sized data: memory per worker, and host-side images/s with RandAugment.

Part 1, memory. Writes a decode-once cache entry shaped like NIH ChestX-ray14 at 224 px (grey,
112,120 images; ``--scale 8`` writes an eighth and the figures are scaled up), then starts
``--workers`` processes, as a node starts its training workers, each of which reads the entry and
feeds one epoch of the training batch path (label ratio 1.0). Each worker reports its private
memory (USS: pages no other process shares) and resident memory beyond what it held after its
imports. Two ways, in one run:

- ``copies``: how a worker held data before: a private copy of the whole split (the pinned
  tensor), a second copy of the label ratio's subset, a batch gathered by fancy indexing;
- ``shared``: :class:`medpeft_ray.train.engine.Batches` over the entry's read-only map: rows as an
  index, each batch gathered straight into a staging buffer, one batch ahead on a thread.

Part 2, throughput. Images/s of the host side of a RandAugment batch (gather, RandAugment,
into the staging buffer) at 224 px: on the training thread (how it ran before), and in a pool of
1..``--processes`` augmentation processes (what a GPU worker with spare CPUs runs now).

    python bench/data_path.py                       # 1/8 of NIH, 4 workers, pools of 1..2
    python bench/data_path.py --scale 1 --workers 8 --processes 8
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

NIH_IMAGES = 112_120
#: NIH's official split: 86,524 train+val images, 25,596 test (train and val drawn from the first)
NIH_TEST = 25_596
NIH_VAL_FRACTION = 0.1


def build_entry(images: int, size: int) -> dict:
    """A cache entry of ``images`` grey ``size`` px images in NIH's proportions; returns its key."""
    from medpeft_ray.data.base import DatasetSplits, LabeledImages
    from medpeft_ray.data.cache import cached_splits

    test = round(images * NIH_TEST / NIH_IMAGES)
    val = round((images - test) * NIH_VAL_FRACTION)
    train = images - test - val
    rng = np.random.default_rng(0)

    def split(n: int) -> LabeledImages:
        pixels = np.empty((n, size, size), dtype=np.uint8)
        for start in range(0, n, 1024):  # noise compresses nothing and pages like real images
            pixels[start:start + 1024] = rng.integers(0, 256, size=(min(1024, n - start), size, size), dtype=np.uint8)
        return LabeledImages(pixels, (rng.random((n, 14)) < 0.1).astype(np.float32), np.arange(n))

    key = {"dataset": "bench-nih", "images": images, "image_size": size}
    cached_splits(key, lambda: DatasetSplits(split(train), split(val), split(test), tuple(f"c{i}" for i in range(14)),
                                             "multilabel"))
    return key


def _memory() -> tuple[float, float]:
    import psutil

    info = psutil.Process().memory_full_info()
    return info.uss / 2**20, info.rss / 2**20


def worker(mode: str, key: dict, batch_size: int, out: "multiprocessing.Queue", done: "multiprocessing.Barrier") -> None:
    import torch

    from medpeft_ray.data.cache import cached_splits
    from medpeft_ray.train.engine import Batches

    torch.set_num_threads(1)
    uss0, rss0 = _memory()
    data = cached_splits(key, lambda: None)  # the entry exists: a read
    rows = np.arange(len(data.train))  # label ratio 1.0
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))
    chunks = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    if mode == "copies":
        images = torch.from_numpy(np.array(data.train.images, copy=True))  # the worker's copy of the split
        subset = images[torch.from_numpy(rows)]  # the trial's copy of its label ratio's subset
        for chunk in chunks:
            x = subset[chunk].float().div_(255.0)  # a batch by fancy indexing, then to the device
    else:
        batches = Batches(data.train.images, data.train.labels, torch.device("cpu"), 0.5, 0.25, rows=rows)
        for x, _ in batches.iterate(chunks, torch.float32, None):
            pass
    del x
    # measured once every worker has read the split: a page of the map is private to a worker
    # only while no other worker has it mapped
    done.wait()
    uss, rss = _memory()
    out.put((mode, uss - uss0, rss - rss0))


def measure_memory(key: dict, workers: int, batch_size: int) -> dict[str, list[tuple[float, float]]]:
    context = multiprocessing.get_context("spawn")
    results: dict[str, list[tuple[float, float]]] = {}
    for mode in ("copies", "shared"):
        out, done = context.Queue(), context.Barrier(workers)
        procs = [context.Process(target=worker, args=(mode, key, batch_size, out, done)) for _ in range(workers)]
        for proc in procs:
            proc.start()
        got = [out.get() for _ in procs]
        for proc in procs:
            proc.join()
        results[mode] = [(uss, rss) for _, uss, rss in got]
    return results


def measure_throughput(key: dict, batch_size: int, processes: int, batches: int) -> dict[str, float]:
    import torch

    from medpeft_ray.data.cache import cached_splits
    from medpeft_ray.train.engine import AugmentPool, Batches

    torch.set_num_threads(1)
    data = cached_splits(key, lambda: None)
    rng = np.random.default_rng(0)
    chunks = [torch.from_numpy(rng.choice(len(data.train), batch_size, replace=False)) for _ in range(batches)]
    rates: dict[str, float] = {}
    for count in range(0, processes + 1):
        feed = Batches(data.train.images, data.train.labels, torch.device("cpu"), 0.5, 0.25, "randaug",
                       rows=np.arange(len(data.train)), augment_processes=count)
        seeds = [(s, s) for s in range(len(chunks))]
        pool = AugmentPool.of(feed.images, count) if count else None
        if pool is not None:  # the pool's processes start (fork) before the clock
            list(feed._host_batches(chunks[:count + 1], seeds, pool))
        started = time.perf_counter()
        for _ in feed._host_batches(chunks, seeds, pool):
            pass
        rates["training thread" if count == 0 else f"pool of {count}"] = len(chunks) * batch_size / (time.perf_counter() - started)
    if AugmentPool._current is not None:
        AugmentPool._current.close()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=8, help="write 1/SCALE of NIH's 112,120 images and scale up")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=4, help="training workers of the node (processes)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="largest augmentation pool")
    parser.add_argument("--batches", type=int, default=12, help="RandAugment batches timed per setting")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="medpeft-bench-"))
    os.environ["MEDPEFT_CACHE"] = str(work / "cache")
    try:
        images = NIH_IMAGES // args.scale
        started = time.perf_counter()
        key = build_entry(images, args.image_size)
        entry_mb = sum(p.stat().st_size for p in (work / "cache").rglob("*.npy")) / 2**20
        print(f"cache entry: {images:,} images at {args.image_size} px, {entry_mb:,.0f} MB "
              f"(written in {time.perf_counter() - started:.0f} s); NIH whole: {entry_mb * args.scale:,.0f} MB")

        memory = measure_memory(key, args.workers, args.batch_size)
        print(f"\nmemory per worker beyond its imports, {args.workers} workers, one epoch at label ratio 1.0 (MB):")
        print(f"{'':8} {'private':>9} {'resident':>9}")
        for mode, values in memory.items():
            print(f"{mode:8} {max(u for u, _ in values):9,.0f} {max(r for _, r in values):9,.0f}")
        copies, shared = (max(u for u, _ in memory[mode]) for mode in ("copies", "shared"))
        print(f"private memory, copies / shared: {copies / max(1.0, shared):,.1f}x; at NIH's size the copies grow "
              f"to about {copies * args.scale:,.0f} MB per worker, while shared stays at its batch buffers "
              "(the split is read through the node's one page cache)")

        rates = measure_throughput(key, args.batch_size, args.processes, args.batches)
        print(f"\nhost-side RandAugment at {args.image_size} px (gather + augment into the staging buffer), images/s:")
        base = rates["training thread"]
        for name, rate in rates.items():
            print(f"{name:16} {rate:8,.0f}  ({rate / base:.2f}x the training thread)")
        per_process = max(rate / int(name.split()[-1]) for name, rate in rates.items() if name != "training thread") \
            if len(rates) > 1 else base
        print(f"processes for 2,500 images/s at this rate per process: {int(np.ceil(2500 / per_process))} "
              f"(a GPU worker on an 8-GPU node with 96 CPUs holds 12)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

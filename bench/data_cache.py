"""Images/s feeding a training epoch from the decode-once cache versus decoding files every epoch.

Builds an image-folder dataset of radiograph-sized PNGs, then measures in one run: the time to
build the cache, and the images per second that reach the training batch (uint8 -> device ->
augment -> normalise) when read from the cache and when decoded from the files each epoch.

    python bench/data_cache.py                  # 600 images, 1024 px PNGs, 224 px input
    python bench/data_cache.py --images 200 --source-size 512
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def make_folder(root: Path, images: int, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(images):
        cls = ("normal", "pneumonia")[i % 2]
        (root / cls).mkdir(parents=True, exist_ok=True)
        # smooth anatomy-like structure plus noise: compresses like a radiograph, not like white noise
        body = 0.5 + 0.3 * np.sin(6 * xx + i) * np.cos(4 * yy) + 0.05 * rng.standard_normal((size, size))
        Image.fromarray((np.clip(body, 0, 1) * 65535).astype(np.uint16)).save(root / cls / f"{i:05d}.png")


def feed(batches, n: int, batch_size: int) -> None:
    """One epoch through the training batch path (the same code the worker loop runs)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(n, generator=gen)
    for start in range(0, n, batch_size):
        batches.get(order[start : start + batch_size], torch.float32, gen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--source-size", type=int, default=1024, help="side of the PNG files (NIH: 1024)")
    parser.add_argument("--image-size", type=int, default=224, help="training input side")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="medpeft-bench-"))
    os.environ["MEDPEFT_CACHE"] = str(work / "cache")
    import torch

    from medpeft_ray.data import load_splits
    from medpeft_ray.data.folder import list_folder
    from medpeft_ray.data.records import decode_all
    from medpeft_ray.train.engine import Batches

    torch.set_num_threads(1)
    try:
        root = work / "data"
        t = time.perf_counter()
        make_folder(root, args.images, args.source_size)
        print(f"dataset: {args.images} PNGs of {args.source_size} px (16-bit) written in {time.perf_counter() - t:.1f} s")
        options = {"val_fraction": 0.0, "test_fraction": 0.0}

        t = time.perf_counter()
        load_splits("folder", root, args.image_size, options, 0)
        build_s = time.perf_counter() - t

        cached_rates, decoded_rates = [], []
        files = [p for classes in list_folder(root).values() for ps in classes.values() for p in ps]
        labels = np.zeros((len(files), 2), np.float32)
        for _ in range(args.epochs):
            t = time.perf_counter()
            splits = load_splits("folder", root, args.image_size, options, 0)  # a cache hit: memory-mapped
            feed(Batches(splits.train.images, splits.train.labels, torch.device("cpu"), 0.5, 0.25, "crop_flip"),
                 len(splits.train), args.batch_size)
            cached_rates.append(len(splits.train) / (time.perf_counter() - t))

            t = time.perf_counter()
            images = decode_all(files, args.image_size, skip_unreadable=False).images  # what a per-epoch loader does
            feed(Batches(images, labels, torch.device("cpu"), 0.5, 0.25, "crop_flip"), len(images), args.batch_size)
            decoded_rates.append(len(images) / (time.perf_counter() - t))

        cached, decoded = max(cached_rates), max(decoded_rates)
        print(f"cache build (decode + resize + write, {os.cpu_count()} cores): {build_s:.1f} s "
              f"({args.images / build_s:.0f} images/s)")
        print(f"epoch from the cache:          {cached:8.0f} images/s")
        print(f"epoch decoding files:          {decoded:8.0f} images/s")
        print(f"ratio cache / decode:          {cached / decoded:8.1f}x")
        print(f"the cache pays for itself after {build_s / (args.images / decoded - args.images / cached):.2f} epochs")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

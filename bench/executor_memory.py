"""Whether a warm executor's memory grows with the trials it has run, measured in one search.

One search of ``--trials`` trials (default 24) of README's LoRA space, one at a time on one
executor, alternating LoRA and full fine-tuning when ``--methods`` names both (full fine-tuning
allocates the most per trial: every weight, its gradient and its Adam moments). Every trial
reports its worker's resident memory (RSS) after its first epoch, and on a GPU the trial's peak
and reserved GPU memory. Printed: the figures per trial, the growth from the second trial (the
first one loads the backbone and warms the allocators) to the last, and that growth per trial.

    python bench/executor_memory.py                          # 24 trials, lora and full, CPU
    python bench/executor_memory.py --trials 20 --methods lora --backbone vit_base_patch16_224 --image-size 224
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def run(args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    methods = args.methods.split(",")
    raw: dict[str, Any] = {
        "experiment": "executor-memory",
        "dataset": {"name": "synthetic", "label_ratios": [1.0], "image_size": args.image_size,
                    "options": {"num_patients": args.patients}},
        "model": {"backbone": args.backbone},
        "method": {"name": methods if len(methods) > 1 else methods[0]},
        "space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-3, "log": True}},
        "train": {"epochs": args.epochs, "batch_size": 16, "augment": "flip"},
        "search": {"num_samples": args.trials, "max_concurrent": 1, "scheduler": {"type": "none"}, "seed": 0,
                   # the methods in turn, so each kind of trial follows the other
                   "points_to_evaluate": [{"method": methods[i % len(methods)]} for i in range(args.trials)]
                   if len(methods) > 1 else []},
        "resources": {"cpus_per_worker": args.threads, "gpus_per_worker": "auto"},
    }
    work = Path(tempfile.mkdtemp(prefix="medpeft-memory-"))
    space = work / "memory.yaml"
    space.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MEDPEFT_CACHE": str(work / "cache")}
    search = subprocess.run([sys.executable, "-m", "medpeft_ray.cli", "search", "--space", str(space), "--results",
                             str(work / "results")], env=env, capture_output=True, text=True)
    if search.returncode != 0:
        raise SystemExit(f"search failed:\n{search.stdout[-3000:]}\n{search.stderr[-3000:]}")
    results = sorted((work / "results" / "tune").glob("*/run_trial*/result.json"),
                     key=lambda p: int(p.parent.name.split("_")[3]))
    trials = []
    for path in results:
        first = json.loads(next(line for line in path.read_text().splitlines() if line.strip()))
        config = json.loads((path.parent / "params.json").read_text())
        trials.append({"method": config.get("method", methods[0]), "rss_mb": first["worker_rss_mb"],
                       "gpu_peak_mb": first.get("gpu_memory_mb"), "gpu_reserved_mb": first.get("gpu_reserved_mb"),
                       "startup_s": sum(v for k, v in first.get("startup", {}).items())})
    second, middle, last = trials[1], trials[len(trials) // 2], trials[-1]
    return {
        # over the second half: after the allocators have seen every kind of trial at least once
        "rss_growth_second_half_mb": last["rss_mb"] - middle["rss_mb"],
        "second_half_trials": len(trials) - 1 - len(trials) // 2,
        "config": {"backbone": args.backbone, "image_size": args.image_size, "methods": methods, "trials": len(trials)},
        "trials": trials,
        "rss_growth_mb": last["rss_mb"] - second["rss_mb"],
        "rss_growth_per_trial_mb": (last["rss_mb"] - second["rss_mb"]) / max(1, len(trials) - 2),
        "rss_last_over_second": last["rss_mb"] / second["rss_mb"],
        "gpu_reserved_growth_mb": (last["gpu_reserved_mb"] - second["gpu_reserved_mb"])
        if last.get("gpu_reserved_mb") is not None else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--backbone", default="vit_tiny_patch16_224")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patients", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    c = result["config"]
    print(f"{c['trials']} trials of {'/'.join(c['methods'])} on {c['backbone']} at {c['image_size']} px, one executor")
    for i, t in enumerate(result["trials"]):
        gpu = f", GPU peak {t['gpu_peak_mb']:.0f} MiB, reserved {t['gpu_reserved_mb']:.0f} MiB" if t["gpu_peak_mb"] else ""
        print(f"  trial {i + 1:2d} ({t['method']}): RSS {t['rss_mb']:.0f} MiB{gpu}")
    print(f"RSS growth from trial 2 to trial {c['trials']}: {result['rss_growth_mb']:+.1f} MiB "
          f"({result['rss_growth_per_trial_mb']:+.2f} MiB per trial; last / second {result['rss_last_over_second']:.3f}x)")
    print(f"RSS growth over the second half ({result['second_half_trials']} trials): "
          f"{result['rss_growth_second_half_mb']:+.1f} MiB")
    if result["gpu_reserved_growth_mb"] is not None:
        print(f"GPU reserved memory growth: {result['gpu_reserved_growth_mb']:+.0f} MiB")


if __name__ == "__main__":
    main()

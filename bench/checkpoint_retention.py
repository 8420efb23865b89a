"""Checkpoint bytes a search leaves in storage: per-trial retention alone versus the study's retention.

Runs the retention code a search runs (each epoch's record by the trial's executor, then
:class:`medpeft_ray.search.callbacks.CheckpointRetention` as each trial ends) over a simulated
study: ``--trials`` trials of ``--epochs`` epochs, validation AUROCs drawn from a fixed seed,
``--methods`` methods, each checkpoint a file of ``--checkpoint-mb`` (1 MB stands for the 1.4 GB
of a fully fine-tuned ViT-B; the ratio does not depend on it). Prints the bytes kept with the
trials' own retention only (the best ``checkpoints_to_keep`` epochs and the latest of every
trial: how searches kept them before) and with the study's, and scales both to ViT-B.

    python bench/checkpoint_retention.py                    # 24 trials, 10 epochs, 2 methods
    python bench/checkpoint_retention.py --trials 1000 --checkpoint-mb 0.01
"""

from __future__ import annotations

import argparse
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np

VIT_B_FULL_CHECKPOINT_GB = 1.4


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.parent.name.startswith("checkpoint_"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--methods", type=int, default=2)
    parser.add_argument("--checkpoint-mb", type=float, default=1.0)
    parser.add_argument("--checkpoint-trials", type=int, default=5, help="search.checkpoint_trials")
    parser.add_argument("--keep", type=int, default=2, help="train.checkpoints_to_keep")
    args = parser.parse_args()

    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import tiny_search

    from medpeft_ray.config import validate_search_dict
    from medpeft_ray.search.callbacks import CheckpointRetention
    from medpeft_ray.search.trial import trial_folder
    from medpeft_ray.search.trial_checkpoints import TrialCheckpoints

    config = validate_search_dict(tiny_search(search={"checkpoint_trials": args.checkpoint_trials},
                                              train={"checkpoints_to_keep": args.keep}), "bench.yaml")
    rng = np.random.default_rng(0)
    payload = b"\0" * int(args.checkpoint_mb * 2**20)
    work = Path(tempfile.mkdtemp(prefix="medpeft-bench-"))
    try:
        kept_bytes = {}
        for mode in ("per trial", "per study"):
            root = work / mode.replace(" ", "-")
            folder = functools.partial(trial_folder, str(root), "study")
            retention = CheckpointRetention(config, folder)
            part = work / "part"
            part.mkdir(exist_ok=True)
            (part / "trainable.safetensors").write_bytes(payload)
            for trial in range(args.trials):
                trial_id = f"t{trial:04d}"
                store = TrialCheckpoints(folder(trial_id), args.keep, "val_auroc", "max")
                skill = rng.uniform(0.6, 0.9)
                for epoch in range(1, args.epochs + 1):
                    value = float(skill - 0.2 * np.exp(-epoch / 3) + rng.normal(0, 0.01))
                    store.upload(part, epoch)
                    store.record(epoch, value, {"val_auroc": value})
                if mode == "per study":
                    retention.ended(trial_id, f"method{trial % args.methods}")
            kept_bytes[mode] = folder_bytes(root)
            rng = np.random.default_rng(0)  # the same study both ways
        print(f"{args.trials} trials x {args.epochs} epochs, {args.methods} methods; checkpoints_to_keep {args.keep}, "
              f"checkpoint_trials {args.checkpoint_trials}")
        for mode, size in kept_bytes.items():
            count = size / len(payload)
            print(f"{mode:10} {count:6.0f} checkpoints kept = {count * VIT_B_FULL_CHECKPOINT_GB:8,.1f} GB at ViT-B full "
                  "fine-tuning")
        print(f"per trial / per study: {kept_bytes['per trial'] / max(1, kept_bytes['per study']):.1f}x; the first grows "
              f"with the trials ({(args.keep + 1) * VIT_B_FULL_CHECKPOINT_GB * 1000 / 1000:.1f} TB per 1,000), the second "
              f"stays at most {args.methods * args.checkpoint_trials * args.keep} checkpoints per study")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

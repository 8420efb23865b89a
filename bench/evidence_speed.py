"""What a comparison's statistics cost per cell, measured in one run: the bootstrap interval of the
AUROC and of F1, BCa against the percentile method, the paired tests, and a cell read back from the
interval cache. The data are synthetic predictions the size of a real test split:

    python bench/evidence_speed.py                         # 25,000 images, 2,800 patients, 14 classes, 3 seeds
    python bench/evidence_speed.py --images 2000 --patients 700

Printed: seconds per call (median of ``--repeat``) and the ratios that matter: percentile over BCa
(what ``BCA_MAX_UNITS`` trades), and a cached cell over a computed one.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from medpeft_ray.evaluation import intervals
from medpeft_ray.evaluation.intervals import bootstrap_interval
from medpeft_ray.evaluation.paired import paired_test
from medpeft_ray.evaluation.predictions import SplitPredictions, write_predictions
from medpeft_ray.leaderboard.evidence import EvidenceSettings, IntervalCache, PredictionFiles, interval_of


def _runs(images: int, patients: int, classes: int, seeds: int, signal: float, seed: int) -> list[SplitPredictions]:
    fixed = np.random.default_rng(0)  # the same images (patients and labels) for every configuration
    groups = fixed.integers(0, patients, images).astype(str)
    labels = (fixed.random((images, classes)) < 0.1).astype(np.float32)
    rng = np.random.default_rng(seed)
    return [SplitPredictions("test", 1, (signal * labels + rng.random((images, classes))).astype(np.float32) / (1 + signal),
                             labels, groups, tuple(f"c{k}" for k in range(classes)), True, np.full(classes, 0.5))
            for _ in range(seeds)]


def _median_seconds(call, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=25_000)
    parser.add_argument("--patients", type=int, default=2_800)
    parser.add_argument("--classes", type=int, default=14)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    mine = _runs(args.images, args.patients, args.classes, args.seeds, 0.4, 1)
    theirs = _runs(args.images, args.patients, args.classes, args.seeds, 0.3, 2)

    def interval(metric: str, method: str) -> None:
        limit = intervals.BCA_MAX_UNITS
        intervals.BCA_MAX_UNITS = args.patients + 1 if method == "BCa" else 0
        try:
            bootstrap_interval(mine, metric)
        finally:
            intervals.BCA_MAX_UNITS = limit

    seconds = {
        "AUROC interval, BCa": _median_seconds(lambda: interval("test_auroc", "BCa"), args.repeat),
        "AUROC interval, percentile": _median_seconds(lambda: interval("test_auroc", "percentile"), args.repeat),
        "F1 interval, percentile": _median_seconds(lambda: interval("test_f1", "percentile"), args.repeat),
        "DeLong (macro, seeds as a contrast)": _median_seconds(lambda: paired_test(mine, theirs, "test_auroc"),
                                                               args.repeat),
        "F1 paired permutation (5,000)": _median_seconds(lambda: paired_test(mine, theirs, "test_f1"), args.repeat),
    }
    with tempfile.TemporaryDirectory() as folder:
        rows = []
        for i, run in enumerate(mine):
            write_predictions(f"{folder}/t{i}/predictions", run)
            rows.append({"id": i, "trial_id": f"t{i}", "predictions": f"{folder}/t{i}/predictions", "best_epoch": 1})
        frame, cell = pd.DataFrame(rows), {"ids": list(range(len(mine))), "split": "test"}
        cache = IntervalCache(Path(folder) / "cache")
        settings = EvidenceSettings()
        seconds["a cell, computed"] = _median_seconds(
            lambda: interval_of(cell, "val_auroc", settings, PredictionFiles(frame, cache=IntervalCache(
                Path(tempfile.mkdtemp(dir=folder))))), 1)
        interval_of(cell, "val_auroc", settings, PredictionFiles(frame, cache=cache))
        seconds["a cell, from the cache"] = _median_seconds(
            lambda: interval_of(cell, "val_auroc", settings, PredictionFiles(frame, cache=cache)), args.repeat)
    print(f"{args.images:,} images of {args.patients:,} patients, {args.classes} classes, {args.seeds} seeds; "
          f"2,000 resamples; median of {args.repeat}")
    for name, value in seconds.items():
        print(f"  {name:40s} {value:8.3f} s")
    print(f"percentile / BCa (AUROC interval): {seconds['AUROC interval, percentile'] / seconds['AUROC interval, BCa']:.2f}")
    print(f"cached / computed (a cell):        {seconds['a cell, from the cache'] / seconds['a cell, computed']:.4f}")


if __name__ == "__main__":
    main()

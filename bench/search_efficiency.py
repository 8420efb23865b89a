"""Compute each search strategy spends to get within 0.5 AUROC points of the full grid's best.

Trials are replayed from a fixed, deterministic surrogate of PEFT fine-tuning results (validation
AUROC per epoch as a function of learning rate, LoRA rank, weight decay and label ratio, with a
seeded per-configuration offset and per-epoch noise), so strategies are compared on the same
problem in one run and in minutes. The strategies themselves are the real ones: a Ray Tune
study with medpeft_ray's Optuna search space, samplers and schedulers (`search.sampler`,
`search.scheduler`), and warm-start points as `search.warm_start` passes them.

- **grid**: every combination of the grid (8 learning rates x 4 ranks x 2 weight decays) for the
  full epochs: the grid's best is known only once all of it ran.
- **random**, **tpe**: full-length trials over the continuous learning rate and the same choices.
- **tpe+asha**: TPE with ASHA stopping weak trials at epoch rungs.
- **tpe+asha+warm**: the same, starting from the two best configurations of the neighbouring
  label ratio (10% labels when searching 1%), as `warm_start.from_leaderboard` does.

For each strategy and seed, the epochs trained until some trial reports a validation AUROC within
0.5 points of the grid's best; the median over seeds is compared with the grid's epochs (goal:
TPE+ASHA at most a quarter of the grid).

    python bench/search_efficiency.py                   # label ratio 0.01, 3 seeds
    python bench/search_efficiency.py --seeds 5 --max-trials 48 --json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any

EPOCHS = 16
GRID_LR = [10 ** (-4 + i * 3 / 7) for i in range(8)]  # 1e-4 .. 1e-1, log-spaced
RANKS = [2, 4, 8, 16]
WEIGHT_DECAYS = [0.0, 0.05]
TOLERANCE = 0.005  # 0.5 AUROC points


def _unit_noise(*key: Any) -> float:
    """A deterministic number in [-1, 1) from ``key``."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**63 - 1.0


def surrogate_auroc(lr: float, rank: int, weight_decay: float, ratio: float, epoch: int) -> float:
    """Validation AUROC after ``epoch`` epochs: a curve rising to a configuration's plateau.

    The best learning rate and rank shift with the label ratio (fewer labels: larger lr, smaller
    rank), low learning rates learn slowly (a trial stopped early may have been a good one), and
    every configuration has its own offset and per-epoch noise.
    """
    scarce = -math.log10(ratio)  # 0 at 100% labels, 2 at 1%
    best_lr, best_rank = 2e-3 * 2**scarce, 16 / 2**scarce
    plateau = (0.80 - 0.05 * scarce
               - 0.06 * (math.log10(lr) - math.log10(best_lr)) ** 2
               - 0.004 * (math.log2(rank) - math.log2(best_rank)) ** 2
               + (0.004 if weight_decay > 0 else 0.0)
               + 0.006 * _unit_noise("config", round(math.log10(lr), 3), rank, weight_decay, ratio))
    tau = min(8.0, max(1.0, 2.5 * (best_lr / lr) ** 0.4))  # epochs to ~63% of the plateau
    value = plateau - (plateau - 0.5) * math.exp(-epoch / tau)
    return value + 0.003 * _unit_noise("epoch", round(math.log10(lr), 3), rank, weight_decay, ratio, epoch)


def grid_best(ratio: float) -> tuple[float, list[dict[str, Any]]]:
    """The grid's best final AUROC at ``ratio`` and its configurations, best first."""
    scored = sorted(((max(surrogate_auroc(lr, r, wd, ratio, e) for e in range(1, EPOCHS + 1)),
                      {"lr": lr, "rank": r, "weight_decay": wd})
                     for lr in GRID_LR for r in RANKS for wd in WEIGHT_DECAYS), key=lambda t: -t[0])
    return scored[0][0], [config for _, config in scored]


def trainable(config: dict[str, Any], ratio: float) -> None:
    """A Tune trial replaying the surrogate, one report per epoch (as a medpeft_ray trial reports)."""
    from ray import tune

    for epoch in range(1, EPOCHS + 1):
        auroc = surrogate_auroc(config["lr"], config["rank"], config["weight_decay"], ratio, epoch)
        tune.report({"val_auroc": auroc, "epoch": epoch})


def run_strategy(name: str, ratio: float, seed: int, target: float, max_trials: int, warm: list[dict], storage: str) -> dict[str, Any]:
    """One Tune study; returns the epochs trained until the target was reached (None if never)."""
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from medpeft_ray.config import CategoricalDistribution, FloatDistribution, SearchSettings
    from medpeft_ray.search.space import SpaceSampler, make_sampler, make_scheduler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler_name = "random" if name == "random" else "tpe"
    scheduler = {"type": "asha", "grace_period": 1, "reduction_factor": 3} if "asha" in name else {"type": "none"}
    settings = SearchSettings(num_samples=max_trials, sampler=sampler_name, seed=seed, scheduler=scheduler)
    distributions = {
        "lr": FloatDistribution(type="float", low=1e-4, high=1e-1, log=True),
        "rank": CategoricalDistribution(type="categorical", choices=RANKS),
        "weight_decay": CategoricalDistribution(type="categorical", choices=WEIGHT_DECAYS),
    }
    points = [dict(p) for p in warm] if name.endswith("warm") else None
    searcher = OptunaSearch(space=SpaceSampler(distributions), metric="val_auroc", mode="max",
                            sampler=make_sampler(settings, distributions), points_to_evaluate=points)

    class Meter(tune.Callback, tune.Stopper):
        """Counts epochs in the order they are trained; stops the study once the target is hit."""

        def __init__(self) -> None:
            self.epochs, self.reached, self.trials = 0, None, set()

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            self.epochs += 1
            self.trials.add(trial.trial_id)
            if self.reached is None and result["val_auroc"] >= target:
                self.reached = self.epochs

        def __call__(self, trial_id: str, result: dict) -> bool:
            return False

        def stop_all(self) -> bool:
            return self.reached is not None

    meter = Meter()
    tuner = tune.Tuner(
        tune.with_parameters(trainable, ratio=ratio),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=make_scheduler(settings, EPOCHS),
                                    num_samples=max_trials, max_concurrent_trials=1, reuse_actors=True),
        run_config=tune.RunConfig(name=f"{name}-{seed}", storage_path=storage, stop=meter, callbacks=[meter], verbose=0),
    )
    tuner.fit()
    return {"epochs_to_target": meter.reached, "epochs": meter.epochs, "trials": len(meter.trials)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.01, help="label ratio searched")
    parser.add_argument("--neighbour", type=float, default=0.1, help="label ratio the warm start comes from")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-trials", type=int, default=40, help="trials per study before giving up")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    best, _ = grid_best(args.ratio)
    target = best - TOLERANCE
    warm = grid_best(args.neighbour)[1][:2]
    grid_epochs = len(GRID_LR) * len(RANKS) * len(WEIGHT_DECAYS) * EPOCHS
    started = time.time()
    runs: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="medpeft-search-bench-") as storage:
        for name in ("random", "tpe", "tpe+asha", "tpe+asha+warm"):
            runs[name] = [run_strategy(name, args.ratio, seed, target, args.max_trials, warm, storage)
                          for seed in range(args.seeds)]
            print(f"{name}: {[r['epochs_to_target'] for r in runs[name]]}", file=sys.stderr)
    ray.shutdown()

    rows = [{"strategy": "grid", "median_epochs": grid_epochs, "per_seed": [grid_epochs], "ratio_to_grid": 1.0}]
    for name, results in runs.items():
        # a study that never reached the target counts as all the epochs it trained (a lower bound)
        per_seed = [r["epochs_to_target"] if r["epochs_to_target"] is not None else r["epochs"] for r in results]
        median = statistics.median(per_seed)
        rows.append({"strategy": name, "median_epochs": median, "per_seed": per_seed,
                     "reached": sum(r["epochs_to_target"] is not None for r in results), "ratio_to_grid": median / grid_epochs})
    report = {"label_ratio": args.ratio, "grid_best_auroc": best, "target_auroc": target, "seeds": args.seeds,
              "max_trials": args.max_trials, "rows": rows, "wall_s": time.time() - started}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"label ratio {args.ratio:g}: grid best val AUROC {best:.4f}; target {target:.4f} (within 0.5 points); "
          f"{args.seeds} seed(s), at most {args.max_trials} trials x {EPOCHS} epochs per study")
    print(f"{'strategy':<15}{'epochs to target (median)':>27}{'vs grid':>10}   per seed")
    for row in rows:
        reached = "" if row["strategy"] == "grid" else f"   ({row['reached']}/{args.seeds} reached)"
        print(f"{row['strategy']:<15}{row['median_epochs']:>27g}{row['ratio_to_grid']:>10.3f}   {row['per_seed']}{reached}")
    asha = next(r for r in rows if r["strategy"] == "tpe+asha")
    print(f"goal: tpe+asha <= 0.25 of the grid's epochs -> {asha['ratio_to_grid']:.3f} "
          f"({'met' if asha['ratio_to_grid'] <= 0.25 else 'not met'}); {report['wall_s']:.0f} s")


if __name__ == "__main__":
    main()

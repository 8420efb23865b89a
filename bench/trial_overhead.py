"""What a search trial costs over the same training as a plain PyTorch loop, measured in one run.

1. **Plain loop**: a fresh Python process imports torch/timm/peft, builds the backbone with the
   method, and trains it with AdamW + warm-up/cosine on the decode-once cache, evaluating the
   validation AUROC every epoch: what a hand-written script pays. Its wall time includes its
   imports, as a script's does.
2. **Trials**: ``medpeft-ray search`` runs the same configuration (nothing searched, ``--trials``
   identical trials one after another) through Ray Tune, Ray Train and DeepSpeed, with per-epoch
   checkpoints, twice: on a warm executor (the default: the first trial pays the executor's
   set-up, later ones start on the loaded backbone) and cold (``resources.warm_executors: false``:
   every trial is a Ray Train run of its own). A trial's cost is its wall time in the leaderboard
   (trial start to trial end); the Ray cluster's own start, paid once per search, is reported apart.

Reported: each trial's start-up (trial start to its first training step), the first trial's and
the median of the later ones, and the ratio of the median later trial to the plain loop (goal
<= 1.1x warm); the start-up breakdown of the last trial shows where the remaining overhead goes.

    python bench/trial_overhead.py                                  # search_spaces/lora.yaml at label ratio 1
    python bench/trial_overhead.py --trials 5 --epochs 2 --json
    python bench/trial_overhead.py --modes warm                     # skip the cold search
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def plain_loop(trial_json: str, threads: int) -> dict[str, Any]:
    """The plain PyTorch loop (run in its own process by the parent)."""
    started = time.time()
    import math

    import numpy as np
    import torch
    import torch.nn.functional as F

    from medpeft_ray.config import TrialConfig
    from medpeft_ray.data import load_splits, train_subset_index
    from medpeft_ray.methods import prepare_model
    from medpeft_ray.metrics import mean_auroc
    from medpeft_ray.models import build_backbone
    from medpeft_ray.models.normalisation import input_statistics
    from medpeft_ray.train.engine import Batches, build_optimizer, warmup_cosine

    imported = time.time()
    torch.set_num_threads(threads)
    trial = TrialConfig.model_validate(json.loads(trial_json))
    torch.manual_seed(trial.train.seed)
    ds = trial.dataset
    data = load_splits(ds.name, ds.root, ds.image_size, ds.options, ds.seed)
    train = data.train.subset(train_subset_index(data, trial.label_ratio, ds.seed))
    model = build_backbone(trial.model.backbone, data.num_classes, ds.image_size, drop_path=trial.train.drop_path)
    model = prepare_model(model, trial.method.name, trial.method.options, trial.family)
    batch = trial.train.batch_size
    steps = math.ceil(len(train) / batch)
    optimizer = build_optimizer(model, trial.train)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(trial.train, steps))
    cpu = torch.device("cpu")
    stats = input_statistics(trial.model)
    train_batches = Batches(train.images, train.labels, cpu, stats.mean, stats.std, trial.train.augment)
    val_batches = Batches(data.val.images, data.val.labels, cpu, stats.mean, stats.std)
    first_step = time.time()
    aurocs = []
    for epoch in range(trial.train.epochs):
        model.train()
        generator = torch.Generator().manual_seed(epoch)
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(order), batch):
            x, y = train_batches.get(order[start : start + batch], torch.float32, generator)
            loss = F.binary_cross_entropy_with_logits(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), trial.train.deepspeed.gradient_clipping or math.inf)
            optimizer.step()
            schedule.step()
        model.eval()
        with torch.no_grad():
            scores = [torch.sigmoid(model(val_batches.get(torch.arange(i, min(i + 128, len(val_batches))), torch.float32, None)[0]))
                      for i in range(0, len(val_batches), 128)]
        aurocs.append(mean_auroc(data.val.labels, np.concatenate([s.numpy() for s in scores]))[0])
    ended = time.time()
    return {"imports_s": imported - started, "startup_s": first_step - started, "train_s": ended - first_step,
            "val_auroc": aurocs}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    from medpeft_ray.config import load_search_config

    raw = yaml.safe_load(Path(args.space).read_text())
    raw["experiment"] = "overhead"
    raw["dataset"]["label_ratios"] = [args.label_ratio]
    if args.epochs:
        raw["train"]["epochs"] = args.epochs
    # one fixed configuration: the first choice / lower bound of each searched parameter
    fixed = {}
    for name, dist in (raw.get("space") or {}).items():
        fixed[name] = dist["choices"][0] if dist["type"] == "categorical" else dist["low"]
    raw["space"] = {}
    for name, value in fixed.items():
        if name in ("lr", "weight_decay", "momentum", "warmup_epochs", "layer_decay", "drop_path", "batch_size"):
            raw["train"][name] = value
        else:
            raw["method"].setdefault("options", {})[name] = value
    raw["search"] = {**raw.get("search", {}), "num_samples": args.trials, "scheduler": {"type": "none"}, "max_concurrent": 1}
    raw["resources"] = {**raw.get("resources", {}), "cpus_per_worker": args.threads, "gpus_per_worker": 0}

    work = Path(tempfile.mkdtemp(prefix="medpeft-overhead-"))
    space = work / "overhead.yaml"
    space.write_text(yaml.safe_dump(raw))
    config = load_search_config(space)
    trial = config.trial_config(args.label_ratio, {})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MEDPEFT_CACHE": str(work / "cache")}

    # warm the decode-once cache and the file system's copy of every module, so neither side pays it
    subprocess.run([sys.executable, "-m", "medpeft_ray.cli", "data", "check", "--space", str(space)], env=env,
                   check=True, capture_output=True)

    started = time.time()
    out = subprocess.run([sys.executable, __file__, "--plain", trial.model_dump_json(), "--threads", str(args.threads)],
                         env=env, check=True, capture_output=True, text=True)
    plain_wall = time.time() - started
    plain = json.loads(out.stdout.strip().splitlines()[-1])

    searches = {mode: _search(work, raw, mode, env) for mode in args.modes.split(",")}
    return {
        "config": {"backbone": trial.model.backbone, "method": trial.method.name, "image_size": trial.dataset.image_size,
                   "epochs": trial.train.epochs, "train_images": next(iter(searches.values()))["train_images"],
                   "threads": args.threads},
        "plain_wall_s": plain_wall,
        "plain": plain,
        "searches": searches,
        "ratios_over_plain": {mode: s["later_trial_wall_median_s"] / plain_wall for mode, s in searches.items()},
    }


def _search(work: Path, raw: dict[str, Any], mode: str, env: dict[str, str]) -> dict[str, Any]:
    """One search of identical trials, on a warm executor or cold; each trial's cost and start-up."""
    import yaml

    from medpeft_ray.leaderboard import LeaderboardStore

    raw = {**raw, "experiment": f"overhead-{mode}",
           "resources": {**raw["resources"], "warm_executors": mode == "warm"}}
    space = work / f"overhead-{mode}.yaml"
    space.write_text(yaml.safe_dump(raw))
    results = work / f"results-{mode}"
    started = time.time()
    search = subprocess.run([sys.executable, "-m", "medpeft_ray.cli", "search", "--space", str(space), "--results",
                             str(results)], env=env, capture_output=True, text=True)
    search_wall = time.time() - started
    if search.returncode != 0:
        raise SystemExit(f"{mode} search failed:\n{search.stdout[-3000:]}\n{search.stderr[-3000:]}")
    rows = LeaderboardStore(f"sqlite:///{results / 'leaderboard.db'}", create=False).query()
    # Tune names trial folders run_trial-<study>_<trial id>_<number>_...: order the rows as the trials ran
    tune_results = sorted((results / "tune").glob("*/run_trial*/result.json"), key=lambda p: int(p.parent.name.split("_")[3]))
    order = [p.parent.name.split("_")[2] for p in tune_results]
    rows = rows.set_index("trial_id").loc[order]
    walls = [float(w) for w in rows["wall_time_s"]]
    startups = [float(s) for s in rows["startup_s"]]
    first_epoch = [json.loads(next(ln for ln in p.read_text().splitlines() if ln.strip())) for p in tune_results]
    dispatched = [e.get("dispatched_at") for e in first_epoch]
    if all(dispatched):  # the order in which the executor took them (a waiting trial may overtake)
        taken = sorted(range(len(dispatched)), key=lambda i: dispatched[i])
        walls, startups, first_epoch = ([x[i] for i in taken] for x in (walls, startups, first_epoch))
        rows = rows.iloc[taken]
        dispatched = [dispatched[i] for i in taken]
        # A warm executor holds its next trial waiting beside it (Tune has already started it), so a
        # trial's wall time includes that wait: what a trial costs its slot is the time from the
        # executor taking it to the executor taking the next one.
        walls = [later - earlier for earlier, later in zip(dispatched, dispatched[1:])] + walls[-1:]
    utilisation = next((line for line in search.stdout.splitlines() if line.startswith("slot utilisation")), "")
    later_walls, later_startups = walls[1:] or walls, startups[1:] or startups
    return {
        "trial_wall_s": walls,
        "trial_startup_s": startups,
        "trial_train_s": [float(s) for s in rows["train_time_s"]],
        "first_trial_startup_s": startups[0],
        "later_trial_startup_median_s": statistics.median(later_startups),
        "later_trial_wall_median_s": statistics.median(later_walls),
        "search_wall_s": search_wall,
        "ray_and_search_setup_s": search_wall - sum(walls),
        "slot_utilisation": utilisation.split()[2] if utilisation else None,
        "train_images": first_epoch[-1].get("train_images"),
        "last_trial_startup_breakdown_s": first_epoch[-1].get("startup", {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default=str(ROOT / "search_spaces" / "lora.yaml"))
    parser.add_argument("--label-ratio", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=0, help="override train.epochs (0: the YAML's)")
    parser.add_argument("--trials", type=int, default=4, help="identical trials run one after another")
    parser.add_argument("--modes", default="warm,cold", help="which searches to run: warm, cold or both")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the plain loop and of each trial's worker")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--plain", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:
        print(json.dumps(plain_loop(args.plain, args.threads)))
        return
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    c, p = result["config"], result["plain"]
    print(f"{c['method']} on {c['backbone']}, {c['image_size']} px, {c['train_images']} training images, "
          f"{c['epochs']} epochs, {c['threads']} thread(s)")
    print(f"plain PyTorch loop: {result['plain_wall_s']:.1f} s  (imports {p['imports_s']:.1f} s, "
          f"start-up {p['startup_s']:.1f} s, training + eval {p['train_s']:.1f} s)")
    for mode, search in result["searches"].items():
        print(f"\n{mode} trials (search {search['search_wall_s']:.0f} s, {search['slot_utilisation'] or '?'} slot utilisation):")
        for i, (wall, start, train) in enumerate(zip(search["trial_wall_s"], search["trial_startup_s"], search["trial_train_s"])):
            print(f"  trial {i + 1}: {wall:.1f} s  (start-up {start:.1f} s, training + eval {train:.1f} s)")
        print(f"  start-up: first trial {search['first_trial_startup_s']:.1f} s, "
              f"median of later trials {search['later_trial_startup_median_s']:.2f} s")
        print(f"  Ray start and search set-up, once per search: {search['ray_and_search_setup_s']:.1f} s")
        print("  start-up of the last trial, by phase: " + ", ".join(
            f"{k.removesuffix('_s')} {v:.2f} s" for k, v in search["last_trial_startup_breakdown_s"].items()))
        print(f"  ratio later trial / plain loop (median): {result['ratios_over_plain'][mode]:.2f}x"
              + ("  (goal: <= 1.1x)" if mode == "warm" else ""))
    if {"warm", "cold"} <= result["searches"].keys():
        warm, cold = result["searches"]["warm"], result["searches"]["cold"]
        print(f"\nwarm / cold: median later start-up {warm['later_trial_startup_median_s']:.2f} s vs "
              f"{cold['later_trial_startup_median_s']:.1f} s; search wall time {warm['search_wall_s']:.0f} s vs "
              f"{cold['search_wall_s']:.0f} s ({warm['search_wall_s'] / cold['search_wall_s']:.2f}x)")


if __name__ == "__main__":
    main()

"""Training-step time of every registered PEFT method relative to full fine-tuning.

For one timm backbone, builds the model once per method (same seed, random init, ``prepare_model``
with the method's default options) and times a plain PyTorch training step on a fixed random batch:
forward, BCE-with-logits loss on multi-label targets, backward, AdamW step over the trainable
parameters only (no DeepSpeed, no data loading). After a few warm-up steps per method, the methods
take turns in rounds (a few steps each, the order shuffled every round) and each step is timed on
its own; the median over all of a method's steps is reported. Interleaving spreads every method
over the whole run, so a slow spell of a shared machine hits them all alike and all ratios to
``full`` come from the same run. On CUDA the step runs under bf16 autocast and the peak memory of
each method's step is reported (the other methods' resident models not counted). Absolute times
depend on the machine; the ratios are the result. On a small shared VM, ``--threads 1`` can give
steadier numbers than all cores (one contended core stalls every multi-threaded op).

    python bench/method_step_time.py                          # vit_small_patch16_224, 96 px, batch 16, CPU or GPU
    python bench/method_step_time.py --backbone resnet50      # the resnet family's methods
    python bench/method_step_time.py --methods full,lora,vpt_deep --rounds 30 --threads 1
    python bench/method_step_time.py --device cuda --image-size 224 --batch-size 64 --json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field


@dataclass
class Entry:
    """One method's model, optimizer and measurements."""

    method: str
    model: object = None
    optimizer: object = None
    trainable: int = 0
    total: int = 0
    step_ms: list[float] = field(default_factory=list)
    peak_bytes: int = 0
    error: str | None = None


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resident_bytes(entry: Entry) -> int:
    """Bytes the entry keeps between its steps: parameters, buffers, optimizer state (grads are freed)."""
    import torch

    tensors = list(entry.model.parameters()) + list(entry.model.buffers())
    for state in entry.optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors if t.is_cuda)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vit_small_patch16_224", help="timm name (vit_*/deit_* or resnet*)")
    parser.add_argument("--image-size", type=int, default=96, help="input side (small: CPU-friendly)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-classes", type=int, default=14, help="multi-label outputs (NIH ChestX-ray14: 14)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per method per turn")
    parser.add_argument("--rounds", type=int, default=5, help="round-robin passes over the methods (shuffled order)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method after building it")
    parser.add_argument("--methods", default=None, help="comma list (default: every method of the backbone's family); "
                        "full is always added as the reference")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    parser.add_argument("--threads", type=int, default=default_threads(), help="torch CPU threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    from medpeft_ray.methods import count_parameters, get_method, list_methods, prepare_model
    from medpeft_ray.models import backbone_family, build_backbone

    family = backbone_family(args.backbone)
    if family is None:
        parser.error(f"--backbone {args.backbone!r}: neither a ViT nor a ResNet timm name")
    if args.methods:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        for method in methods:
            try:
                spec = get_method(method)
            except KeyError as exc:
                parser.error(str(exc.args[0]))
            if family not in spec.families:
                parser.error(f"method {method!r} does not apply to {family} backbones")
    else:
        methods = list_methods(family)
    methods = ["full"] + [m for m in dict.fromkeys(methods) if m != "full"]

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    else:
        device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen).to(device)
    targets = (torch.rand(args.batch_size, args.num_classes, generator=gen) < 0.3).float().to(device)

    def step(entry: Entry) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = entry.model(images)
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets)
        loss.backward()
        entry.optimizer.step()
        entry.optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    say(f"{args.backbone} ({family}), {args.image_size} px, batch {args.batch_size}, device {device}"
        f"{' (bf16 autocast)' if cuda else f', {args.threads} threads'}; {len(methods)} methods, "
        f"{args.warmup} warm-up + {args.rounds} rounds x {args.steps} steps each")

    entries: list[Entry] = []
    t0 = time.perf_counter()
    for method in methods:
        entry = Entry(method)
        try:
            torch.manual_seed(args.seed)
            model = build_backbone(args.backbone, args.num_classes, args.image_size)
            model = prepare_model(model, method, {}, family).to(device)
            model.train()
            entry.model = model
            entry.trainable, entry.total = count_parameters(model)
            entry.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            for _ in range(args.warmup):  # also creates the optimizer state
                step(entry)
            sync()
        except Exception as exc:  # noqa: BLE001  (one broken method should not hide the others)
            entry.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
            entry.model = entry.optimizer = None
            if method == "full":
                raise
        entries.append(entry)
    say(f"built and warmed up in {time.perf_counter() - t0:.0f} s")

    live = [e for e in entries if e.error is None]
    order_rng = random.Random(args.seed)
    for r in range(args.rounds):
        order = live[:]
        order_rng.shuffle(order)
        for entry in order:
            if cuda:
                other = torch.cuda.memory_allocated(device) - resident_bytes(entry)
                torch.cuda.reset_peak_memory_stats(device)
            for _ in range(args.steps):
                start = time.perf_counter()
                step(entry)
                sync()
                entry.step_ms.append((time.perf_counter() - start) * 1000)
            if cuda:
                entry.peak_bytes = max(entry.peak_bytes, torch.cuda.max_memory_allocated(device) - other)
        if (r + 1) % max(1, args.rounds // 5) == 0 or r + 1 == args.rounds:
            say(f"round {r + 1}/{args.rounds} done ({time.perf_counter() - t0:.0f} s)")

    full_ms = statistics.median(entries[0].step_ms)
    full_total = entries[0].total
    results = []
    for entry in entries:
        row = {"method": entry.method, "trainable_params": entry.trainable, "total_params": entry.total,
               "trainable_pct": 100 * entry.trainable / full_total if entry.total else None}
        if entry.error:
            row["error"] = entry.error
        else:
            ms = statistics.median(entry.step_ms)
            q1, _, q3 = statistics.quantiles(entry.step_ms, n=4) if len(entry.step_ms) > 1 else [ms] * 3
            row.update(ms_per_step=ms, ratio_to_full=ms / full_ms, min_ms=min(entry.step_ms),
                       iqr_pct=100 * (q3 - q1) / ms, step_ms=[round(t, 3) for t in entry.step_ms])
            if cuda:
                row["peak_mem_mib"] = entry.peak_bytes / 2**20
        results.append(row)
    results.sort(key=lambda row: (row["method"] != "full", row.get("ratio_to_full", float("inf"))))

    if args.json:
        print(json.dumps({
            "backbone": args.backbone, "family": family, "image_size": args.image_size,
            "batch_size": args.batch_size, "num_classes": args.num_classes, "device": str(device),
            "autocast": "bf16" if cuda else None, "threads": None if cuda else args.threads,
            "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup, "results": results,
        }, indent=2))
        return

    mem = " peak MiB" if cuda else ""
    print(f"\n{'method':<17}{'trainable':>13}{'train %':>9}{'ms/step':>10}{'IQR':>8}{'x full':>8}{mem}")
    for row in results:
        line = f"{row['method']:<17}{row['trainable_params']:>13,}{row['trainable_pct'] or 0:>8.2f}%"
        if "error" in row:
            print(f"{row['method']:<17}  failed: {row['error']}")
            continue
        line += f"{row['ms_per_step']:>10.1f}{row['iqr_pct']:>7.0f}%{row['ratio_to_full']:>7.2f}x"
        if cuda:
            line += f"{row['peak_mem_mib']:>9.0f}"
        print(line)
    print("\ntrain %: of the backbone's parameters; IQR: interquartile range of the "
          "timed steps over their median; x full: median ms/step over full's")
    noisy = [row["method"] for row in results if row.get("iqr_pct", 0) > 25]
    if noisy:
        print(f"noisy timings (IQR > 25% of the median: {', '.join(noisy)}): the machine was busy; "
              f"try more --rounds{' or --threads 1' if not cuda and args.threads > 1 else ''}")


if __name__ == "__main__":
    main()

"""Memory, training images/s and FID of each generation method on one device, measured in one run.

Each method trains the same U-Net (built-in pipeline, random weights unless ``--checkpoint``) on the
same synthetic captions with the real generation recipe (:class:`GenerationRecipe`: DeepSpeed, bf16
on GPU), for ``--steps`` micro-steps at ``--batch-size``; then it samples ``--fid-images`` images
for the fixed validation prompts and scores FID (a stand-in feature extractor without
``--fid-weights``). Reported per method: trainable parameters, peak GPU memory of the trial (on
CPU: the process's peak resident memory, which only grows, so read it for the first method
only), training images/s over the timed steps (the first step is a warm-up), sampling time and
FID; and each method's memory and throughput as a ratio of full fine-tuning's.

    python bench/generation_methods.py                                  # unet_tiny, 32 px, CPU-sized
    python bench/generation_methods.py --backbone unet_sd15 --image-size 256 --batch-size 8 \\
        --methods full,bitfit --steps 30 --fid-images 16                # a real-size U-Net on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def config(args: argparse.Namespace, method: str) -> Any:
    from medpeft_ray.config import validate_search_dict

    raw = {
        "experiment": "bench-generation", "task": "generation",
        "dataset": {"name": "synthetic", "label_ratios": [1.0], "image_size": args.image_size,
                    "options": {"num_patients": args.patients}},
        "model": {"backbone": args.backbone, "checkpoint": args.checkpoint},
        "method": {"name": method, "options": {"dropout": 0.0} if method == "lora" else {}},
        "train": {"epochs": 1, "batch_size": args.batch_size, "augment": "none", "lr": args.lr,
                  "eval_batch_size": args.batch_size},
        "search": {"scheduler": {"type": "none"}, "fid": {"images": args.fid_images, "steps": args.sample_steps},
                   "fid_weights": args.fid_weights},
    }
    search = validate_search_dict(raw, "bench.yaml")
    return search.trial_config(1.0, search.search_space.first_point(method))


def measure(recipe: Any, trial: Any, steps: int) -> dict[str, Any]:
    import torch

    use_gpu = recipe.use_gpu
    if use_gpu:
        torch.cuda.reset_peak_memory_stats(recipe.ctx.device)
    state = recipe.build(trial, None, None)
    try:
        engine = state.engine
        engine.train()
        gen = torch.Generator().manual_seed(0)
        shape = tuple(state.train.latent_mean.shape[1:])
        timesteps = state.noise_scheduler.config.num_train_timesteps
        timed, images = 0.0, 0
        for step in range(steps + 1):  # step 0 warms up (kernels, allocator), untimed
            index = torch.randint(0, len(state.train), (state.micro_batch,), generator=gen)
            noise, latent_noise = torch.randn((len(index), *shape), generator=gen), torch.randn((len(index), *shape), generator=gen)
            t = torch.randint(0, timesteps, (len(index),), generator=gen)
            if use_gpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss = recipe.noise_loss(state, state.train, index, noise, t, latent_noise)
            engine.backward(loss)
            engine.step()
            if use_gpu:
                torch.cuda.synchronize()
            if step:
                timed += time.perf_counter() - start
                images += len(index)
        start = time.perf_counter()
        fid, _, _ = recipe.score(trial, state, state.val, "val")
        sample_s = time.perf_counter() - start
        memory = (torch.cuda.max_memory_allocated(recipe.ctx.device) / 2**20 if use_gpu
                  else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return {"method": trial.method.name, "trainable_params": state.trainable_params,
                "total_params": state.total_params, "memory_mb": memory,
                # fp32 gradients and AdamW's two moments of the trainable parameters: what PEFT saves
                "train_state_mb": state.trainable_params * (4 + 8) / 2**20, "memory_kind": "gpu_peak" if use_gpu else "rss_peak",
                "images_per_s": images / timed if timed else float("nan"), "sample_s": sample_s, "fid": fid,
                "final_loss": float(loss.detach()), "fid_stand_in": recipe.fid_scorer(trial, "val", state.val.images).stand_in}
    finally:
        recipe.release(state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="unet_tiny", choices=["unet_tiny", "unet_sd15"])
    parser.add_argument("--checkpoint", default=None, help="a pipeline folder in the diffusers layout")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--patients", type=int, default=40, help="synthetic patients (2 images each)")
    parser.add_argument("--methods", default="full,bitfit,norm,attention,lora,difffit,sv_diff")
    parser.add_argument("--steps", type=int, default=20, help="timed training micro-steps per method")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--fid-images", type=int, default=16)
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--fid-weights", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from medpeft_ray.train.engine import WorkerContext, ensure_process_group
    from medpeft_ray.train.generation import GenerationRecipe

    use_gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(args.threads)
    ensure_process_group("nccl" if use_gpu else "gloo")
    recipe = GenerationRecipe(WorkerContext(0, 1, device))
    rows = [measure(recipe, config(args, method), args.steps) for method in args.methods.split(",")]
    reference = next((r for r in rows if r["method"] == "full"), rows[0])
    for row in rows:
        row["memory_vs_full"] = row["memory_mb"] / reference["memory_mb"]
        row["images_per_s_vs_full"] = row["images_per_s"] / reference["images_per_s"]
    device_name = torch.cuda.get_device_name(device) if use_gpu else f"CPU, {args.threads} threads"
    if args.json:
        print(json.dumps({"device": device_name, "args": vars(args), "rows": rows}, indent=1))
        return
    print(f"{args.backbone} at {args.image_size} px, batch {args.batch_size}, {args.steps} timed steps, on {device_name}; "
          f"FID of {args.fid_images} samples ({'stand-in features' if rows[0]['fid_stand_in'] else 'Inception-v3'})")
    print(f"{'method':<10} {'trainable':>13} {'grad+Adam':>10} {'peak MiB':>9} {'x full':>7} {'img/s':>8} "
          f"{'x full':>7} {'sample s':>9} {'FID':>7}")
    for r in rows:
        print(f"{r['method']:<10} {r['trainable_params']:>13,} {r['train_state_mb']:>10.1f} {r['memory_mb']:>9.0f} "
              f"{r['memory_vs_full']:>7.2f} {r['images_per_s']:>8.1f} {r['images_per_s_vs_full']:>7.2f} "
              f"{r['sample_s']:>9.1f} {r['fid']:>7.3f}")
    print("grad+Adam: MiB of fp32 gradients and AdamW moments of the trainable parameters")
    if not use_gpu:
        print("memory on CPU is the process's peak resident set, which only grows: compare on a GPU")


if __name__ == "__main__":
    main()

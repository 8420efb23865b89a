"""One command that checks a GPU machine for searches, and writes what it found to one JSON file.

Sections (each time-boxed; an error is recorded in its section and the rest still run):

1. ``versions``: GPU, driver, CUDA, torch, DeepSpeed, peft, timm, Ray.
2. ``methods_bf16``: every registered method on every family it applies to, one bf16 training
   step through the recipe's DeepSpeed engine at ZeRO 0 and 3 (finite loss or the error).
3. ``throughput``: ViT-B/16 at 224 px, LoRA and full fine-tuning: images/s end to end (cached
   uint8 images through the recipe's batches, augmentation, engine step) with and without
   RandAugment, and model-only (a resident batch); MFU from ``torch.utils.flop_counter`` against
   the card's dense bf16 peak (``--peak-tflops``, H100 SXM: 989).
4. ``warm_trials``: GPU and host memory over 20 trials on one recipe (as on a warm executor), one
   of which fails with a NaN loss: the peak per trial must not grow.
5. ``resume``: a bf16 trial resumed from its epoch-1 checkpoint gives epoch 2's numbers exactly.
6. ``unet``: the U-Net at Stable Diffusion v1.5 size, 256 px, full and LoRA: images/s and peak memory.

``--tiny`` runs every section on the CPU with small models and sizes (the method table with three
methods per family at ZeRO 0), so the test suite keeps it working on machines without a GPU (the
figures then mean nothing).

    python bench/gpu_check.py --out gpu_check.json            # on a GPU machine, under 8 minutes
    python bench/gpu_check.py --tiny --out /tmp/check.json    # CPU smoke run (the test suite's)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: seconds each section may take (a section stops starting new work past its box)
BOXES = {"versions": 30, "methods_bf16": 150, "throughput": 120, "warm_trials": 90, "resume": 45, "unet": 45}


def _trial(backbone: str, method: str, *, precision: str, zero: int = 0, image_size: int, batch: int,
           epochs: int = 1, augment: str = "none", lr: float = 1e-3, num_patients: int = 40) -> Any:
    """A trial on the synthetic data (backbone, method, precision and sizes as given)."""
    from medpeft_ray.config import MethodConfig, validate_search_dict

    raw = {
        "experiment": "gpu-check",
        "dataset": {"name": "synthetic", "label_ratios": [1.0], "image_size": image_size,
                    "options": {"num_patients": num_patients, "num_classes": 3}},
        "model": {"backbone": "vit_tiny_patch16_224"},
        "method": {"name": "lora"},
        "train": {"epochs": epochs, "batch_size": batch, "augment": augment, "lr": lr, "precision": precision,
                  "deepspeed": {"zero_stage": zero}},
        "search": {"num_samples": 1},
    }
    base = validate_search_dict(raw, "gpu_check.yaml").search_space.trial_config(1.0, {})
    return base.model_copy(update={"model": base.model.model_copy(update={"backbone": backbone}),
                                   "method": MethodConfig(name=method)})


class Check:
    def __init__(self, tiny: bool) -> None:
        import torch

        from medpeft_ray.train.engine import WorkerContext, ensure_process_group

        self.tiny = tiny
        self.device = torch.device("cuda:0" if torch.cuda.is_available() and not tiny else "cpu")
        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        ensure_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.ctx = WorkerContext(0, 1, self.device)
        self.bf16 = "bf16"

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def recipe(self) -> Any:
        from medpeft_ray.train.recipe import TrialRecipe

        return TrialRecipe(self.ctx)

    # -- sections ---------------------------------------------------------------------------
    def versions(self, deadline: float) -> dict[str, Any]:
        import deepspeed
        import peft
        import ray
        import timm
        import torch

        out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                               "cuda": torch.version.cuda, "deepspeed": deepspeed.__version__, "peft": peft.__version__,
                               "timm": timm.__version__, "ray": ray.__version__, "device": str(self.device)}
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(0)
            out.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                       capability=f"{props.major}.{props.minor}", bf16_supported=torch.cuda.is_bf16_supported())
            try:
                import subprocess

                out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                               capture_output=True, text=True, timeout=10).stdout.strip()
            except OSError:
                out["driver"] = None
        return out

    def methods_bf16(self, deadline: float) -> dict[str, Any]:
        import torch

        from medpeft_ray.methods import list_methods, prepare_model
        from medpeft_ray.models import build_backbone

        backbones = {"vit": "vit_tiny_patch16_224" if self.tiny else "vit_base_patch16_224",
                     "resnet": "resnet18" if self.tiny else "resnet50", "unet": "unet_tiny"}
        size = 32 if self.tiny else 224
        recipe, results = self.recipe(), {}
        for zero in (0,) if self.tiny else (0, 3):  # the test suite runs both stages (tests/test_precision.py)
            for family, backbone in backbones.items():
                # the CPU smoke run tries the table's code with a few methods per family; every
                # method in bf16 at both stages is tests/test_precision.py's
                for method in list_methods(family)[:3] if self.tiny else list_methods(family):
                    key = f"{family}/{method}/zero{zero}"
                    if time.time() > deadline:
                        results[key] = "not run: section time box spent"
                        continue
                    try:
                        trial = _trial(backbone, method, precision="bf16", zero=zero, image_size=size, batch=2)
                        torch.manual_seed(0)
                        model = prepare_model(build_backbone(backbone, 3, size), method, {}, family)
                        engine, _, _ = recipe.engine(trial, model, train_images=2)
                        if family == "unet":
                            latents = torch.randn(2, 4, 8, 8, device=self.device, dtype=torch.bfloat16)
                            text = torch.randn(2, 7, 32, device=self.device, dtype=torch.bfloat16)
                            out = engine(latents, torch.tensor([10, 700], device=self.device),
                                         encoder_hidden_states=text, return_dict=False)[0]
                        else:
                            out = engine(torch.randn(2, 3, size, size, device=self.device, dtype=torch.bfloat16))
                        loss = out.float().pow(2).mean()
                        engine.backward(loss)
                        engine.step()
                        results[key] = "ok" if math.isfinite(loss.item()) else f"loss {loss.item()}"
                        recipe.release(type("S", (), {"engine": engine})())
                    except Exception as exc:  # noqa: BLE001  (recorded; the table goes on)
                        results[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        failed = {k: v for k, v in results.items() if v != "ok"}
        return {"cases": len(results), "ok": len(results) - len(failed), "failed": failed}

    def throughput(self, deadline: float) -> dict[str, Any]:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from medpeft_ray.data import load_splits
        from medpeft_ray.train.engine import Batches

        backbone, size, batch, steps = (("vit_tiny_patch16_224", 32, 8, 3) if self.tiny
                                        else ("vit_base_patch16_224", 224, 128, 20))
        out: dict[str, Any] = {"backbone": backbone, "image_size": size, "batch": batch}
        recipe = self.recipe()
        for method in ("lora", "full"):
            for augment in ("none", "randaug"):
                if time.time() > deadline:
                    out[f"{method}/{augment}"] = "not run: section time box spent"
                    continue
                trial = _trial(backbone, method, precision="bf16", image_size=size, batch=batch, augment=augment,
                               num_patients=max(batch, 40))
                ds = trial.dataset
                data = load_splits(ds.name, ds.root, ds.image_size, ds.options, ds.seed)
                images = data.train.images[:batch]
                batches = Batches(images, data.train.labels[:batch], self.device, (0.5,) * 3, (0.25,) * 3, augment)
                engine, _, _ = recipe.engine(trial, recipe.build_model(trial, data.num_classes), train_images=batch)
                index, generator = torch.arange(len(images)), torch.Generator().manual_seed(0)

                def step(x: Any, y: Any) -> None:
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(engine(x).float(), y)
                    engine.backward(loss)
                    engine.step()

                x, y = batches.get(index, torch.bfloat16, generator)
                step(x, y)  # warm-up
                with FlopCounterMode(display=False) as flops:
                    step(x, y)
                self.sync()
                started = time.perf_counter()
                for _ in range(steps):
                    step(*batches.get(index, torch.bfloat16, generator))
                self.sync()
                end_to_end = steps * len(images) / (time.perf_counter() - started)
                started = time.perf_counter()
                for _ in range(steps):
                    step(x, y)
                self.sync()
                seconds = time.perf_counter() - started
                model_only = steps * len(images) / seconds
                achieved = flops.get_total_flops() * steps / seconds / 1e12
                out[f"{method}/{augment}"] = {
                    "end_to_end_img_s": round(end_to_end, 1), "model_only_img_s": round(model_only, 1),
                    "tflops": round(achieved, 2),
                    "mfu": round(achieved / self.peak_tflops, 4) if self.device.type == "cuda" else None,
                }
                recipe.release(type("S", (), {"engine": engine})())
        return out

    def warm_trials(self, deadline: float) -> dict[str, Any]:
        import psutil
        import torch

        from medpeft_ray.errors import TrialFailed

        backbone, size = ("vit_tiny_patch16_224", 32) if self.tiny else ("vit_base_patch16_224", 224)
        count = 5 if self.tiny else 20
        recipe, per_trial = self.recipe(), []
        for number in range(count):
            if time.time() > deadline:
                break
            failing = number == count // 2  # a learning rate that makes the loss NaN
            trial = _trial(backbone, "lora", precision="bf16", image_size=size, batch=16, lr=1e30 if failing else 1e-3,
                           num_patients=40)
            outcome = "completed"
            try:
                recipe.run(trial, lambda metrics, directory: None)
            except TrialFailed as exc:
                outcome = f"failed: {exc}"
            entry = {"trial": number, "outcome": outcome, "host_rss_mb": round(psutil.Process().memory_info().rss / 2**20)}
            if self.device.type == "cuda":
                entry["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20)
                entry["gpu_allocated_after_mb"] = round(torch.cuda.memory_allocated(self.device) / 2**20)
            per_trial.append(entry)
        key = "gpu_allocated_after_mb" if self.device.type == "cuda" else "host_rss_mb"
        settled = per_trial[2:] if len(per_trial) > 3 else per_trial
        return {"trials": per_trial, "growth_mb": (settled[-1][key] - settled[0][key]) if settled else None,
                "failed_trials": sum(e["outcome"] != "completed" for e in per_trial)}

    def resume(self, deadline: float) -> dict[str, Any]:
        backbone, size = ("vit_tiny_patch16_224", 32) if self.tiny else ("vit_base_patch16_224", 224)
        trial = _trial(backbone, "lora", precision="bf16", image_size=size, batch=8, epochs=2, augment="crop_flip")
        recipe = self.recipe()
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            kept: dict[int, Any] = {}

            def keep(metrics: dict[str, Any], directory: Any) -> None:
                import shutil

                target = Path(tmp) / f"epoch{metrics['epoch']}"
                shutil.copytree(directory, target)
                kept[int(metrics["epoch"])] = (metrics, target)

            recipe.run(trial, keep)
            resumed: list[dict[str, Any]] = []
            recipe.run(trial, lambda metrics, directory: resumed.append(metrics), resume_from=kept[1][1],
                       history=[kept[1][0]])
        straight = kept[2][0]
        same = all(resumed[0][k] == straight[k] for k in ("train_loss", "val_loss", "val_auroc"))
        return {"epoch2_straight": {k: straight[k] for k in ("train_loss", "val_loss", "val_auroc")},
                "epoch2_resumed": {k: resumed[0][k] for k in ("train_loss", "val_loss", "val_auroc")}, "equal": same}

    def unet(self, deadline: float) -> dict[str, Any]:
        import torch

        from medpeft_ray.methods import prepare_model
        from medpeft_ray.models.unet import build_unet

        backbone, size, batch, steps = ("unet_tiny", 64, 2, 2) if self.tiny else ("unet_sd15", 256, 8, 5)
        recipe, out = self.recipe(), {"backbone": backbone, "image_size": size, "batch": batch}
        for method in ("lora", "full"):
            if time.time() > deadline:
                out[method] = "not run: section time box spent"
                continue
            trial = _trial(backbone, method, precision="bf16", image_size=size, batch=batch)
            model = prepare_model(build_unet(backbone, size), method, {}, "unet")
            engine, _, _ = recipe.engine(trial, model, train_images=batch)
            width = model.config.cross_attention_dim if hasattr(model, "config") else 32
            latent = size // 8
            latents = torch.randn(batch, 4, latent, latent, device=self.device, dtype=torch.bfloat16)
            text = torch.randn(batch, 77, width, device=self.device, dtype=torch.bfloat16)
            t = torch.randint(0, 1000, (batch,), device=self.device)
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)

            def step() -> None:
                loss = engine(latents, t, encoder_hidden_states=text, return_dict=False)[0].float().pow(2).mean()
                engine.backward(loss)
                engine.step()

            step()
            self.sync()
            started = time.perf_counter()
            for _ in range(steps):
                step()
            self.sync()
            out[method] = {"img_s": round(steps * batch / (time.perf_counter() - started), 2),
                           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
            if self.device.type == "cuda":
                out[method]["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20)
            recipe.release(type("S", (), {"engine": engine})())
        return out


def run(tiny: bool, peak_tflops: float, sections: list[str]) -> dict[str, Any]:
    check = Check(tiny)
    check.peak_tflops = peak_tflops
    report: dict[str, Any] = {"tiny": tiny, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for name in sections:
        started = time.time()
        section: Callable[[float], dict[str, Any]] = getattr(check, name)
        try:
            report[name] = {"status": "ok", **section(started + BOXES[name])}
        except Exception as exc:  # noqa: BLE001  (recorded; the other sections still run)
            report[name] = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                            "trace": traceback.format_exc()[-2000:]}
        report[name]["seconds"] = round(time.time() - started, 1)
        print(f"{name}: {report[name]['status']} in {report[name]['seconds']} s", file=sys.stderr, flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="where the JSON report goes")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run with small models (what the tests run)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the card's dense bf16 peak, for MFU")
    parser.add_argument("--sections", default=",".join(BOXES), help=f"comma-separated, of: {', '.join(BOXES)}")
    args = parser.parse_args()
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(BOXES))
    if unknown:
        parser.error(f"unknown section(s): {', '.join(unknown)}")
    report = run(args.tiny, args.peak_tflops, sections)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""The training engine's parts: DeepSpeed config, optimizer and schedule, batches, augmentation, eval.

:class:`medpeft_ray.train.recipe.TrialRecipe` puts them together into a trial. Nothing here knows
about Ray: the Ray Train worker functions call the recipe with Ray's rank, device and report
function, and a plain process can call it with its own (single runs and benchmarks).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medpeft_ray.config import TrainConfig
from medpeft_ray.metrics import Predictions
from medpeft_ray.models.families import family_of_model, get_family

log = logging.getLogger(__name__)

#: ``report(metrics, checkpoint_dir)``: called once per epoch on every rank with that rank's part
#: of the epoch's checkpoint (rank 0's holds the trainable weights and state; every rank's holds
#: its DeepSpeed shard), which only lives until the call returns. Ray Train merges the parts.
ReportFn = Callable[[dict[str, Any], Path | None], None]


@dataclass(frozen=True)
class WorkerContext:
    rank: int
    world_size: int
    device: torch.device
    #: a checkpoint directory to resume from (a restarted worker), or None
    resume_from: Path | None = None
    #: the dataset's cache key when the driver computed it (saves walking the dataset per trial)
    dataset_key: dict[str, Any] | None = None
    #: when this worker's process and function started (start-up breakdown in the first epoch's metrics)
    started: dict[str, float] | None = None
    #: asked before every training step: True ends the trial (the scheduler stopped it); None: never
    should_stop: Callable[[], bool] | None = None


def load_deepspeed(on_gpu: bool) -> Any:
    """Imports DeepSpeed for this process's device (call before anything else imports it).

    DeepSpeed picks its accelerator once, at import: the CPU one is named here unless the process
    trains on a GPU. On the CPU accelerator, DeepSpeed's first ``init_distributed`` in a process
    probes every op builder (compiler test runs) and JIT-compiles a shared-memory allreduce op into
    ``TORCH_EXTENSIONS_DIR``: about 20 s on 2 cores on a machine that never built it, paid by the
    first trial of a fresh machine (a newcomer's first search, every CI machine). Gloo does the
    same reductions, and CPU trials here are small, so the op is declared unavailable instead,
    which skips both the probe and the build.
    """
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    if not on_gpu and "__compatible_ops__" not in vars(deepspeed.ops):
        from deepspeed.ops.op_builder.all_ops import ALL_OPS

        # read only by DeepSpeed's communication backend (to decide on the op) in the pinned release
        deepspeed.ops.__compatible_ops__ = dict.fromkeys(ALL_OPS, False)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


def resolve_precision(train: TrainConfig, use_gpu: bool) -> str:
    """``auto`` means bf16 on GPUs and fp32 on CPUs (DeepSpeed's CPU accelerator has no fp16)."""
    if train.precision == "auto":
        return "bf16" if use_gpu else "fp32"
    return train.precision


def deepspeed_config(train: TrainConfig, world_size: int, use_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config of a trial: batch sizes, precision, ZeRO stage and clipping."""
    accumulation = train.deepspeed.gradient_accumulation_steps
    micro_batch = max(1, train.batch_size // (world_size * accumulation))
    precision = resolve_precision(train, use_gpu)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * world_size,
        "zero_optimization": zero_config(train, use_gpu),
        "steps_per_print": 10**9,  # progress is reported per epoch, not in DeepSpeed's log
        "wall_clock_breakdown": False,
    }
    if train.deepspeed.offload_optimizer != "none":
        # The optimizer is built here (torch AdamW/SGD, or DeepSpeed's CPU Adam on GPUs); DeepSpeed
        # would otherwise refuse a client optimizer under offload.
        config["zero_force_ds_cpu_optimizer"] = False
    if train.deepspeed.gradient_clipping > 0:
        config["gradient_clipping"] = train.deepspeed.gradient_clipping
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return config


def zero_config(train: TrainConfig, use_gpu: bool) -> dict[str, Any]:
    """DeepSpeed's ``zero_optimization`` section: the stage and where its state lives."""
    ds = train.deepspeed
    config: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer != "none":
        config["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": use_gpu}
    if ds.offload_param != "none":
        config["offload_param"] = {"device": ds.offload_param, "pin_memory": use_gpu}
    if ds.zero_stage == 3:
        # small PEFT tensors (LoRA factors, biases, prompts) stay whole on every rank: gathering them
        # costs more than they save; the frozen backbone's large matrices are still partitioned
        config["stage3_param_persistence_threshold"] = 10**5
    return config


def layer_ids(model: torch.nn.Module, family: str | None = None) -> tuple[dict[str, int], int]:
    """Each trainable parameter's depth for layer-wise lr decay, and the number of layers.

    The backbone's family gives each parameter its depth (:meth:`BackboneFamily.depth_of`): the
    stem (patch embedding, class token, position embedding; a ResNet's first conv) is layer 0,
    ViT block ``i`` (ResNet stage ``i``) is ``i + 1`` (``i`` for ResNet's 1-based ``layer1..4``),
    and everything after the last block (final norm, ``fc_norm``, head) is the top layer.

    Args:
        family: the backbone family's name; by default the family of the timm model name the
            model was built from.
    """
    described = get_family(family) if family is not None else family_of_model(model)
    depth: dict[str, int | None] = {}
    top = 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = described.depth_of(name)
        depth[name] = layer
        top = max(top, layer or 0)
    top += 1
    return {name: top if layer is None else layer for name, layer in depth.items()}, top


def build_optimizer(
    model: torch.nn.Module, train: TrainConfig, use_gpu: bool = False, family: str | None = None
) -> torch.optim.Optimizer:
    """AdamW or SGD over the trainable parameters; no weight decay on biases and norms (1-d).

    With ``layer_decay`` < 1, a parameter ``k`` layers below the top trains at ``lr x decay^k``
    (MAE's fine-tuning recipe); each group's lr is its scaled lr, which the schedule then scales.
    The layers are those of the backbone's ``family`` (see :func:`layer_ids`).
    """
    # without decay every parameter trains at the top layer's lr: no depths needed
    ids, top = layer_ids(model, family) if train.layer_decay < 1 else ({}, 0)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1
        layer = ids[name] if train.layer_decay < 1 else top
        group = groups.setdefault((layer, no_decay), {
            "params": [],
            "weight_decay": 0.0 if no_decay else train.weight_decay,
            "lr": train.lr * train.layer_decay ** (top - layer),
        })
        group["params"].append(param)
    param_groups = [groups[key] for key in sorted(groups)]
    if train.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=train.lr, momentum=train.momentum)
    if use_gpu and train.deepspeed.offload_optimizer == "cpu":
        try:  # ZeRO-Offload's vectorised CPU Adam: the reason to offload at all on a GPU
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(param_groups, lr=train.lr, adamw_mode=True)
        except Exception as exc:  # the op is compiled on first use; no compiler, no op
            log.warning("DeepSpeed's CPU Adam is unavailable (%s); offloaded steps use torch AdamW", exc)
    return torch.optim.AdamW(param_groups, lr=train.lr)


def warmup_cosine(train: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Per-iteration lr factor: linear warm-up for ``warmup_epochs``, then cosine to ``min_lr``."""
    total = max(1, train.epochs * steps_per_epoch)
    warmup = int(round(train.warmup_epochs * steps_per_epoch))
    floor = train.min_lr / train.lr

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def augment(images: torch.Tensor, generator: torch.Generator, kind: str) -> torch.Tensor:
    """Batched augmentation of (B, C, H, W) floats on their own device (the GPU in GPU trials).

    ``crop_flip``: random-resized crop (scale 0.6-1 of the side) and horizontal flip, as one
    ``grid_sample``; ``flip``: horizontal flip only; ``none``: unchanged.
    """
    if kind == "none":
        return images
    b = images.shape[0]
    rand = torch.rand(b, 4, generator=generator).to(images.device)
    flip = torch.where(rand[:, 1] < 0.5, -1.0, 1.0).to(images.device)
    if kind == "flip":
        return torch.where(flip.view(b, 1, 1, 1) < 0, images.flip(-1), images)
    scale = 0.6 + 0.4 * rand[:, 0]
    shift_x = (1 - scale) * (2 * rand[:, 2] - 1)
    shift_y = (1 - scale) * (2 * rand[:, 3] - 1)
    theta = torch.zeros(b, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = scale * flip
    theta[:, 0, 2] = shift_x
    theta[:, 1, 1] = scale
    theta[:, 1, 2] = shift_y
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class RandAugment:
    """The MAE/AdamW recipe's photometric part: timm RandAugment ``rand-m9-mstd0.5-inc1`` per image
    (on the CPU, on uint8 grey or RGB images) and random erasing with probability 0.25 per image
    (batched, on the normalised tensor, on the worker's device). Seeded from the trial, so runs repeat."""

    def __init__(self, seed: int, device: torch.device) -> None:
        from timm.data.auto_augment import rand_augment_transform
        from timm.data.random_erasing import RandomErasing

        # Fill with mid-grey. Magnitudes are drawn around 9 and capped just below 10, where timm's
        # increasing posterize asks for 0 bits, which Pillow refuses.
        self.transforms = {
            mode: rand_augment_transform("rand-m9-mstd0.5-inc1", {"img_mean": fill, "magnitude_max": 9.9})
            for mode, fill in (("L", 128), ("RGB", (128, 128, 128)))
        }
        self.erase = RandomErasing(probability=0.25, mode="pixel", device=str(device))
        self.rng = random.Random(seed)

    def images(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, H, W) grey or (B, H, W, 3) RGB uint8 images, each augmented."""
        from PIL import Image

        mode = "RGB" if batch.ndim == 4 else "L"
        with self._own_streams(batch.device):
            out = [np.asarray(self.transforms[mode](Image.fromarray(img.numpy(), mode=mode))) for img in batch]
        return torch.from_numpy(np.stack(out))

    def erasing(self, x: torch.Tensor) -> torch.Tensor:
        with self._own_streams(x.device):
            return self.erase(x)

    @contextlib.contextmanager
    def _own_streams(self, device: torch.device) -> Iterator[None]:
        """timm draws from Python's, NumPy's and torch's global generators: seed them from this
        recipe's own stream for the call, and give the training loop its generators back after."""
        seed = self.rng.getrandbits(32)
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            try:
                yield
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)


class Batches:
    """Turns cached uint8 images, grey (N, H, W) or RGB (N, H, W, 3), into normalised 3-channel
    batches on the worker's device; ``mean`` and ``std`` per channel (or one value for all three)."""

    def __init__(
        self, images: Any, labels: Any, device: torch.device, mean: float | Sequence[float],
        std: float | Sequence[float], augment: str = "none", seed: int = 0, shared: bool = False,
    ):
        if shared:  # tensors from :meth:`tensors`, shared by trials: only ever indexed (copied), never changed
            self.images, self.labels = images, labels
        else:
            self.images, self.labels = self.tensors(images, labels, pin=device.type == "cuda")
        self.device, self.augment = device, augment
        self.mean, self.std = (torch.tensor([float(v)] * 3 if isinstance(v, (int, float)) else [float(c) for c in v],
                                            device=device).view(1, 3, 1, 1) for v in (mean, std))
        self.randaug = RandAugment(seed, device) if augment == "randaug" else None

    @staticmethod
    def tensors(images: np.ndarray, labels: np.ndarray, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """A split's uint8 images (a private, writable copy of the cache's mmap) and float labels."""
        image_tensor = torch.from_numpy(np.array(images, copy=True))
        if pin:
            image_tensor = image_tensor.pin_memory()
        return image_tensor, torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32))

    def reseed(self, seed: int) -> None:
        """Restarts the augmentation's own random stream (each epoch: a resumed run draws the same)."""
        if self.randaug is not None:
            self.randaug.rng.seed(seed)

    def __len__(self) -> int:
        return len(self.images)

    def get(self, index: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``index``; augmented (training) when ``generator`` is given."""
        images = self.images[index]
        if generator is not None and self.randaug is not None:
            images = self.randaug.images(images)
        x = images.to(self.device, non_blocking=True)
        x = (x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)).float().div_(255.0)
        if generator is not None:  # on one channel where the image is grey
            x = augment(x, generator, "flip" if self.augment == "flip" else "none" if self.augment == "none" else "crop_flip")
        # grey: the same picture in each channel, each normalised with its channel's statistics
        x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        if generator is not None and self.randaug is not None:
            x = self.randaug.erasing(x)
        return x.to(dtype), self.labels[index].to(self.device, non_blocking=True)


def ensure_process_group(backend: str) -> None:
    """A one-process group for runs outside Ray Train (DeepSpeed always needs one).

    The group rendezvous through an in-process store rather than a TCP port: a free port picked
    here can be taken by another process (a Ray worker, a second run) before the group binds it.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return
    # DeepSpeed reads these to decide that a launcher already set the process up.
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "0")):
        os.environ.setdefault(name, value)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def set_determinism(seed: int, deterministic: bool) -> None:
    """Seeds every generator a trial draws from; ``deterministic`` also forbids non-deterministic kernels.

    On CPUs the same seed already gives the same numbers; on GPUs some kernels (atomics in
    backward passes, cuDNN's autotuner) vary between runs unless they are ruled out, at a speed cost.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
    # Both ways, every trial: a warm executor's previous trial must not leave its setting behind.
    torch.use_deterministic_algorithms(deterministic)
    # cuDNN's autotuner picks the fastest convolution per shape (a trial's shapes are fixed): a
    # ResNet's speed-up, at the cost of run-to-run variation
    torch.backends.cudnn.benchmark = not deterministic


def mean_over_ranks(loss_sum: torch.Tensor, steps: int, world_size: int) -> float:
    """The epoch's mean training loss over every rank's steps (so all ranks agree on NaN)."""
    total = torch.stack([loss_sum.detach().float(), torch.tensor(float(steps), device=loss_sum.device)])
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()


def startup_breakdown(started: dict[str, float] | None, marks: dict[str, float], first_step_at: float | None) -> dict[str, float]:
    """Seconds spent in each start-up phase of this worker, from its process start to its first step."""
    points = [*(started or {}).items(), *marks.items(), ("first_step", first_step_at or time.time())]
    points.sort(key=lambda item: item[1])
    return {f"{name}_s": round(t - points[i - 1][1], 3) for i, (name, t) in enumerate(points) if i}


@torch.no_grad()
def evaluate(
    engine: Any,
    batches: Batches,
    dtype: torch.dtype,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    multilabel: bool,
    ctx: WorkerContext,
    batch_size: int,
    subgroups: dict[str, np.ndarray] | None = None,
    thresholds: np.ndarray | None = None,
) -> Predictions:
    """The split's predictions and summed loss, gathered from every rank, for the metrics to score.

    Each rank predicts its stride of the split; rank-local scores are gathered so that each metric
    is computed on the whole split (an average of per-rank AUROCs would be a different number).
    ``subgroups`` (the split's per-image attribute values) and ``thresholds`` (multi-label decision
    thresholds chosen on validation, for the test split) go with the predictions to the metrics.
    """
    engine.eval()
    index = torch.arange(len(batches))[ctx.rank :: ctx.world_size]
    scores, loss_sum = [], 0.0
    for start in range(0, len(index), batch_size):
        x, y = batches.get(index[start : start + batch_size], dtype, None)
        logits = engine(x).float()
        loss_sum += loss_fn(logits, y).item() * len(y)
        probs = torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)
        scores.append(probs.cpu().numpy())
    local = (index.numpy(), np.concatenate(scores) if scores else np.zeros((0, batches.labels.shape[1])), loss_sum)
    if ctx.world_size > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(gathered, local)
    else:
        gathered = [local]
    all_index = np.concatenate([g[0] for g in gathered])
    all_scores = np.concatenate([g[1] for g in gathered])[np.argsort(all_index)]
    return Predictions(batches.labels.numpy(), all_scores, sum(g[2] for g in gathered), multilabel, thresholds,
                       dict(subgroups or {}))

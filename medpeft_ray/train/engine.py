"""The training engine's parts: DeepSpeed config, optimizer and schedule, batches, augmentation, eval.

:class:`medpeft_ray.train.recipe.TrialRecipe` puts them together into a trial. Nothing here knows
about Ray: the Ray Train worker functions call the recipe with Ray's rank, device and report
function, and a plain process can call it with its own (single runs and benchmarks).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import multiprocessing
import os
import queue
import random
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing

from medpeft_ray.config import TrainConfig
from medpeft_ray.errors import MedpeftError
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
    # always written: DeepSpeed clips at 1.0 where the key is absent, so "0 = off" must say 0
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
    model: torch.nn.Module, train: TrainConfig, use_gpu: bool = False, family: str | None = None,
    lr_scales: dict[str, float] | None = None,
) -> torch.optim.Optimizer:
    """AdamW or SGD over the trainable parameters; no weight decay on biases and norms (1-d).

    With ``layer_decay`` < 1, a parameter ``k`` layers below the top trains at ``lr x decay^k``
    (MAE's fine-tuning recipe); each group's lr is its scaled lr, which the schedule then scales.
    The layers are those of the backbone's ``family`` (see :func:`layer_ids`). ``lr_scales`` (the
    method's :meth:`~medpeft_ray.methods.MethodOptions.lr_scales`: a regex over parameter names ->
    factor) multiplies the lr of the parameters whose name matches, in groups of their own.
    """
    # without decay every parameter trains at the top layer's lr: no depths needed
    ids, top = layer_ids(model, family) if train.layer_decay < 1 else ({}, 0)
    groups: dict[tuple[int, bool, float], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1
        layer = ids[name] if train.layer_decay < 1 else top
        scale = next((factor for pattern, factor in (lr_scales or {}).items() if re.search(pattern, name)), 1.0)
        group = groups.setdefault((layer, no_decay, scale), {
            "params": [],
            "weight_decay": 0.0 if no_decay else train.weight_decay,
            "lr": train.lr * train.layer_decay ** (top - layer) * scale,
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
    (on the host, on uint8 grey or RGB images) and random erasing with probability 0.25 per image
    (batched, on the normalised tensor, on the worker's device). Seeded from the trial, so runs repeat.

    Each batch takes two seeds from the recipe's own stream, in batch order (:meth:`batch_seeds`):
    one for its images, one for its erasing. A batch's images therefore come out the same whether
    the training thread augments them or a process of the worker's augmentation pool does, and
    however many processes there are.
    """

    def __init__(self, seed: int, device: torch.device) -> None:
        self.erase = RandomErasing(probability=0.25, mode="pixel", device=str(device))
        self.rng = random.Random(seed)

    def batch_seeds(self, batches: int) -> list[tuple[int, int]]:
        """(images seed, erasing seed) of the next ``batches`` batches."""
        return [(self.rng.getrandbits(32), self.rng.getrandbits(32)) for _ in range(batches)]

    def erasing(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        with _own_streams(x.device, seed):
            return self.erase(x)


@functools.lru_cache(maxsize=None)
def _randaugment_transform(mode: str) -> Any:
    # Fill with mid-grey. Magnitudes are drawn around 9 and capped just below 10, where timm's
    # increasing posterize asks for 0 bits, which Pillow refuses.
    fill = 128 if mode == "L" else (128, 128, 128)
    return rand_augment_transform("rand-m9-mstd0.5-inc1", {"img_mean": fill, "magnitude_max": 9.9})


def randaugment_images(batch: np.ndarray, seed: int) -> np.ndarray:
    """(B, H, W) grey or (B, H, W, 3) RGB uint8 images, each through RandAugment, drawn from ``seed``."""
    mode = "RGB" if batch.ndim == 4 else "L"
    transform = _randaugment_transform(mode)
    with _own_streams(torch.device("cpu"), seed):
        return np.stack([np.asarray(transform(Image.fromarray(img, mode=mode))) for img in batch])


@contextlib.contextmanager
def _own_streams(device: torch.device, seed: int) -> Iterator[None]:
    """timm draws from Python's, NumPy's and torch's global generators: seed them with ``seed`` for
    the call, and give the training loop its generators back after."""
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


# -- the augmentation pool: processes that RandAugment batches off the training thread ----------------

#: the split's images in a pool process (inherited at fork: the same read-only map, no copy)
_POOL_IMAGES: np.ndarray | None = None


def _pool_start(images: np.ndarray) -> None:
    global _POOL_IMAGES
    _POOL_IMAGES = images
    torch.set_num_threads(1)


def _pool_augment(rows: np.ndarray, seed: int) -> np.ndarray:
    assert _POOL_IMAGES is not None
    return randaugment_images(np.take(_POOL_IMAGES, rows, axis=0), seed)


class AugmentPool:
    """A worker's augmentation processes, forked once per images array and kept across trials.

    Forked, so each process reads the parent's memory map of the decode-once cache (nothing is
    copied or pickled but a batch's row numbers and its augmented images). Fork happens from the
    training thread, before the epoch's prefetch thread starts.
    """

    _current: "AugmentPool | None" = None

    def __init__(self, images: np.ndarray, processes: int) -> None:
        self.images, self.processes = images, processes
        self.pool = multiprocessing.get_context("fork").Pool(processes, initializer=_pool_start, initargs=(images,))

    @classmethod
    def of(cls, images: np.ndarray, processes: int) -> "AugmentPool":
        """This process's pool for ``images`` with ``processes`` processes (the last one, if it fits)."""
        current = cls._current
        if current is not None and current.images is images and current.processes == processes:
            return current
        if current is not None:
            current.close()
        cls._current = cls(images, processes)
        return cls._current

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()
        if AugmentPool._current is self:
            AugmentPool._current = None


AUGMENT_PROCESSES_ENV = "MEDPEFT_AUGMENT_PROCESSES"


def augment_processes_override() -> int | None:
    """``MEDPEFT_AUGMENT_PROCESSES`` as a number of processes, None when unset.

    Raises:
        MedpeftError: it is not a whole number of 0 or more (the search's pre-flight asks first).
    """
    raw = os.environ.get(AUGMENT_PROCESSES_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise MedpeftError(f"{AUGMENT_PROCESSES_ENV}={raw!r}: give a whole number of augmentation processes, 0 or more")
    return int(raw)


def augment_processes(augment: str, use_gpu: bool, threads: int) -> int:
    """How many augmentation processes a worker runs: ``MEDPEFT_AUGMENT_PROCESSES`` when set; else,
    for RandAugment on a GPU, one per CPU the worker holds beyond its training thread (at most 8);
    else none (CPU trials train on those CPUs; the other augmentations run on the device)."""
    override = augment_processes_override()
    if override is not None:
        return override
    if augment != "randaug" or not use_gpu:
        return 0
    return max(1, min(8, threads - 1))


class _Staging:
    """Host buffers a batch is gathered into, reused in turn; pinned on GPUs, so that the copy to
    the device is asynchronous. A buffer is refilled only once the copy out of it has finished."""

    def __init__(self, pin: bool, slots: int) -> None:
        self.pin = pin
        self.buffers: list[torch.Tensor | None] = [None] * slots
        self.copied: list[Any] = [None] * slots
        self.turn = 0

    def take(self, shape: tuple[int, ...]) -> tuple[int, torch.Tensor]:
        slot, self.turn = self.turn, (self.turn + 1) % len(self.buffers)
        if self.copied[slot] is not None:
            self.copied[slot].synchronize()
            self.copied[slot] = None
        size = math.prod(shape)
        buffer = self.buffers[slot]
        if buffer is None or buffer.numel() < size:
            buffer = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
            self.buffers[slot] = buffer
        return slot, buffer[:size].view(shape)

    def sent(self, slot: int) -> None:
        """The device copy out of ``slot`` has been queued (on GPUs: refill it once it is done)."""
        if self.pin:
            event = torch.cuda.Event()
            event.record()
            self.copied[slot] = event


#: batches gathered (and augmented) ahead of the training step
PREFETCH_BATCHES = 2


class Batches:
    """Normalised 3-channel batches on the worker's device from uint8 images, grey (N, H, W) or RGB
    (N, H, W, 3); ``mean`` and ``std`` per channel (or one value for all three).

    ``images`` is usually the decode-once cache's read-only memory map, shared by every worker of
    the node and every trial: it is never copied whole. ``rows`` names the images this object
    serves (a label-ratio subset), None for all of them; a batch's rows are gathered straight into
    a (pinned, on GPUs) staging buffer, one batch ahead of the step on a prefetch thread, and copied
    to the device asynchronously. With ``augment_processes``, RandAugment runs in that many
    processes instead of on the prefetch thread; the numbers are the same either way.
    """

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, device: torch.device, mean: float | Sequence[float],
        std: float | Sequence[float], augment: str = "none", seed: int = 0, rows: np.ndarray | None = None,
        augment_processes: int = 0,
    ):
        self.images = images
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        picked = labels if self.rows is None else labels[self.rows]
        self.labels = torch.from_numpy(np.ascontiguousarray(picked, dtype=np.float32))
        self.device, self.augment = device, augment
        self.mean, self.std = (torch.tensor([float(v)] * 3 if isinstance(v, (int, float)) else [float(c) for c in v],
                                            device=device).view(1, 3, 1, 1) for v in (mean, std))
        self.randaug = RandAugment(seed, device) if augment == "randaug" else None
        self.augment_processes = augment_processes if self.randaug is not None else 0
        self.staging = _Staging(pin=device.type == "cuda", slots=PREFETCH_BATCHES + 2)

    def reseed(self, seed: int) -> None:
        """Restarts the augmentation's own random stream (each epoch: a resumed run draws the same)."""
        if self.randaug is not None:
            self.randaug.rng.seed(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, index: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``index`` (positions among the served rows), on the calling thread; augmented
        (training) when ``generator`` is given."""
        return next(self.iterate([index], dtype, generator, prefetch=False))

    def iterate(self, chunks: Sequence[torch.Tensor], dtype: torch.dtype, generator: torch.Generator | None,
                prefetch: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of ``chunks`` (positions among the served rows) in order; augmented (training)
        when ``generator`` is given. The host side (gather, RandAugment) runs ahead on a thread."""
        training = generator is not None and self.randaug is not None
        seeds = self.randaug.batch_seeds(len(chunks)) if training else [(0, 0)] * len(chunks)
        pool = AugmentPool.of(self.images, self.augment_processes) if training and self.augment_processes else None
        host = self._host_batches(chunks, seeds if training else None, pool)
        # RandAugment seeds the process's global generators for its call: on the training thread's
        # process it runs on that thread (a thread beside it would reseed the model's dropout draws)
        if prefetch and len(chunks) > 1 and not (training and pool is None):
            host = _ahead(host, PREFETCH_BATCHES)
        try:
            for (slot, images), chunk, (_, erase_seed) in zip(host, chunks, seeds):
                x = images.to(self.device, non_blocking=True)
                self.staging.sent(slot)
                x = (x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)).float().div_(255.0)
                if generator is not None:  # on one channel where the image is grey
                    x = augment(x, generator, "flip" if self.augment == "flip" else "none" if self.augment == "none" else "crop_flip")
                # grey: the same picture in each channel, each normalised with its channel's statistics
                x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
                if training:
                    x = self.randaug.erasing(x, erase_seed)
                yield x.to(dtype), self.labels[chunk].to(self.device, non_blocking=True)
        finally:
            close = getattr(host, "close", None)
            if close is not None:
                close()

    def _host_batches(self, chunks: Sequence[torch.Tensor], seeds: list[tuple[int, int]] | None,
                      pool: AugmentPool | None) -> Iterator[tuple[int, torch.Tensor]]:
        """Each chunk's images in a staging buffer (slot, uint8 tensor), RandAugmented when ``seeds`` are given."""
        rows = [self._rows(chunk) for chunk in chunks]
        shape = tuple(self.images.shape[1:])
        if pool is not None:
            pending: deque[Any] = deque()
            for k in range(len(rows)):
                while len(pending) <= pool.processes and len(pending) + k < len(rows):
                    i = k + len(pending)
                    pending.append(pool.pool.apply_async(_pool_augment, (rows[i], seeds[i][0])))
                augmented = pending.popleft().get()
                slot, buffer = self.staging.take(augmented.shape)
                buffer.numpy()[...] = augmented
                yield slot, buffer
            return
        for k, batch_rows in enumerate(rows):
            slot, buffer = self.staging.take((len(batch_rows), *shape))
            # straight from the map into the buffer: no intermediate copy of the batch
            np.take(self.images, batch_rows, axis=0, out=buffer.numpy(), mode="clip")
            if seeds is not None:
                buffer.numpy()[...] = randaugment_images(buffer.numpy(), seeds[k][0])
            yield slot, buffer

    def _rows(self, chunk: torch.Tensor) -> np.ndarray:
        positions = chunk.numpy() if isinstance(chunk, torch.Tensor) else np.asarray(chunk)
        return positions.astype(np.int64) if self.rows is None else self.rows[positions]


def _ahead(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """``items``, produced on a thread up to ``depth`` ahead of the consumer; closing the returned
    generator stops the thread. An exception in the producer is raised in the consumer."""
    done = object()
    box: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        box.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            box.put((done, None))
        except BaseException as exc:  # noqa: BLE001  (handed to the consumer, which raises it)
            box.put((done, exc))

    thread = threading.Thread(target=produce, name="medpeft-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = box.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # let a producer blocked on a full queue see the stop
            try:
                box.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)


def ensure_process_group(backend: str) -> None:
    """A one-process group for runs outside Ray Train (DeepSpeed always needs one).

    The group rendezvous through an in-process store rather than a TCP port: a free port picked
    here can be taken by another process (a Ray worker, a second run) before the group binds it.
    """
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
    chunks = [index[start : start + batch_size] for start in range(0, len(index), batch_size)]
    for x, y in batches.iterate(chunks, dtype, None):
        logits = engine(x).float()
        loss_sum += loss_fn(logits, y).item() * len(y)
        probs = torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)
        scores.append(probs.cpu().numpy())
    local = (index.numpy(), np.concatenate(scores) if scores else np.zeros((0, batches.labels.shape[1])), loss_sum)
    if ctx.world_size > 1:
        gathered: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(gathered, local)
    else:
        gathered = [local]
    all_index = np.concatenate([g[0] for g in gathered])
    all_scores = np.concatenate([g[1] for g in gathered])[np.argsort(all_index)]
    return Predictions(batches.labels.numpy(), all_scores, sum(g[2] for g in gathered), multilabel, thresholds,
                       dict(subgroups or {}))

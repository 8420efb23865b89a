"""The sections of a search YAML (``dataset``, ``model``, ``method``, ``train``, ``search``, ``resources``,
``tracking``).

Each is a strict pydantic model whose own validators check what the section alone decides;
checks that span sections live in :mod:`medpeft_ray.config.checks`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from medpeft_ray.data.registry import get_dataset
from medpeft_ray.label_ratios import same_label_ratio
from medpeft_ray.models.families import require_family
from medpeft_ray.metrics import METRICS, MetricName, metric_mode
from medpeft_ray.schema import Strict


def check_experiment_name(name: str | None) -> str | None:
    """An experiment names folders, Tune runs and Optuna studies: a plain, short name."""
    if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name):
        raise ValueError("must be 1-100 letters, digits, '_', '.' or '-' (it names folders)")
    return name


class DatasetConfig(Strict):
    name: str = Field("synthetic", description="dataset format (synthetic, folder, ...)")
    root: Path | None = Field(None, description="dataset folder as downloaded from its publisher")
    label_ratios: list[float] = Field(
        default_factory=lambda: [1.0], min_length=1, description="fractions of the training labels to use"
    )
    image_size: int = Field(224, ge=16, le=1024, description="input side in pixels")
    seed: int = Field(0, description="seed of splits and label-ratio subsets")
    options: dict[str, Any] = Field(default_factory=dict, description="format-specific options")

    @property
    def row_name(self) -> str:
        """What leaderboard rows call this data: the format's name, or the set it names among
        several (MedMNIST's ``dermamnist_224``); see ``DatasetSpec.row_name``."""
        spec = get_dataset(self.name)
        return spec.rows_name(spec.options.model_validate(self.options))

    @field_validator("label_ratios")
    @classmethod
    def _ratios(cls, ratios: list[float]) -> list[float]:
        for r in ratios:
            if not 0.0 < r <= 1.0:
                raise ValueError(f"every label ratio must be in (0, 1], got {r}")
        if len(set(ratios)) != len(ratios):
            raise ValueError("label ratios must be distinct")
        return ratios


class ModelConfig(Strict):
    backbone: str = Field("vit_base_patch16_224", description="timm model name")
    checkpoint: Path | None = Field(None, description="local pre-trained weights (.pth/.safetensors)")
    # The normalisation the backbone was pre-trained with (MRM: 0.4978/0.2449, MAE: 0.4785/0.2834);
    # unset: the weights' own (medpeft_ray.models.normalisation)
    mean: float | list[float] | None = Field(
        None, description="input mean, one value or one per RGB channel (default: the pre-trained weights')")
    std: float | list[float] | None = Field(
        None, description="input std, one value or one per RGB channel (default: the pre-trained weights')")

    @field_validator("mean", "std")
    @classmethod
    def _statistics(cls, value: float | list[float] | None, info: Any) -> float | list[float] | None:
        if value is None:
            return None
        values = [value] if isinstance(value, (int, float)) else list(value)
        if len(values) not in (1, 3):
            raise ValueError(f"give one value or three (R, G, B), not {len(values)}")
        low_ok = (lambda v: v >= 0) if info.field_name == "mean" else (lambda v: v > 0)
        if not all(low_ok(v) and v <= 1 for v in values):
            raise ValueError(f"values must be in {'[0, 1]' if info.field_name == 'mean' else '(0, 1]'}, got {value}")
        return value

    @field_validator("backbone")
    @classmethod
    def _family(cls, name: str) -> str:
        require_family(name)  # ValueError naming what the families cover
        return name


#: the searched parameter that chooses the method when ``method.name`` lists several
METHOD_PARAM = "method"


class MethodConfig(Strict):
    name: str | list[str] = Field(
        "lora", description="PEFT method (see `medpeft-ray methods`), or a list of methods to choose among"
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="fixed method options; with several methods, per method: {lora: {alpha: 32}}"
    )

    @field_validator("name")
    @classmethod
    def _names(cls, name: str | list[str]) -> str | list[str]:
        if isinstance(name, list):
            if not name:
                raise ValueError("must name at least one method")
            if len(set(name)) != len(name):
                raise ValueError("lists a method twice")
            if len(name) == 1:
                return name[0]
        return name

    @property
    def names(self) -> list[str]:
        return [self.name] if isinstance(self.name, str) else list(self.name)

    @property
    def is_choice(self) -> bool:
        """Several methods: the method is itself a searched categorical (``method``)."""
        return isinstance(self.name, list)

    def options_for(self, method: str) -> dict[str, Any]:
        """The fixed options of ``method``."""
        return dict(self.options.get(method) or {}) if self.is_choice else dict(self.options)

    def options_key(self, method: str) -> str:
        """Where the YAML fixes ``method``'s options (the key errors about them name)."""
        return f"method.options.{method}" if self.is_choice else "method.options"

    def name_key(self, index: int) -> str:
        """Where the YAML names the ``index``-th method."""
        return f"method.name.{index}" if self.is_choice else "method.name"


class DeepSpeedConfig(Strict):
    zero_stage: int = Field(0, ge=0, le=3, description="ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters")
    offload_optimizer: Literal["none", "cpu"] = Field(
        "none", description="keep optimizer state (and its step) in CPU memory; needs zero_stage >= 1"
    )
    offload_param: Literal["none", "cpu"] = Field("none", description="keep parameters in CPU memory; needs zero_stage 3")
    gradient_clipping: float = Field(1.0, ge=0, description="max gradient norm (0 = off)")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step (the batch size is per step)")

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> "DeepSpeedConfig":
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ValueError("offload_optimizer: needs zero_stage 1, 2 or 3 (ZeRO owns the state it offloads)")
        if self.offload_param != "none" and self.zero_stage != 3:
            raise ValueError("offload_param: needs zero_stage 3 (only stage 3 partitions parameters)")
        return self


class TrainConfig(Strict):
    epochs: int | dict[float, int] = Field(
        3, description="epochs per trial (the scheduler's budget); or per label ratio, e.g. {0.01: 400, 0.1: 200, "
        "1.0: 100} (MED-PEFT: the fewer the labels, the more epochs)",
    )
    batch_size: int = Field(32, ge=1, description="global batch size (split across a trial's workers)")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="adamw (MAE recipe) or sgd with momentum (the studies' SGD recipe)")
    lr: float = Field(1e-3, gt=0, description="learning rate (absolute)")
    weight_decay: float = Field(0.05, ge=0, description="weight decay (biases and norms, the one-dimensional parameters, take none)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up, then cosine to min_lr")
    min_lr: float = Field(1e-6, ge=0, description="where the cosine schedule ends")
    layer_decay: float = Field(
        1.0, gt=0, le=1, description="layer-wise lr decay: block i of L (1 = first) trains at lr x decay^(L+1-i), the stem at decay^(L+1), the head at lr (MAE recipe: 0.65)"
    )
    drop_path: float = Field(0.0, ge=0, lt=1, description="stochastic depth rate of the backbone (timm's drop_path_rate)")
    augment: Literal["crop_flip", "randaug", "flip", "none"] = Field(
        "crop_flip",
        description="crop_flip: random-resized crop (scale 0.6-1) + horizontal flip (SGD recipe); randaug: that plus "
        "RandAugment m9-mstd0.5 and random erasing 0.25 (AdamW/MAE recipe); flip only; or none",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    eval_batch_size: int = Field(128, ge=1, description="batch size of validation and test passes (no gradients: larger fits)")
    seed: int = Field(0, description="seed of the head's and the method's initialisation, data order, augmentation and dropout")
    deterministic: bool = Field(
        False, description="deterministic kernels only (torch.use_deterministic_algorithms): same seed, same numbers, slower on GPU"
    )
    checkpoints_to_keep: int = Field(2, ge=1, description="per trial: the best epochs' checkpoints kept in storage")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)

    @field_validator("epochs", mode="before")
    @classmethod
    def _epochs_kind(cls, epochs: Any) -> Any:
        # one message for both forms, instead of one per member of the union
        if not isinstance(epochs, (int, dict)) or isinstance(epochs, bool):
            raise ValueError(f"must be an integer, or a mapping of label ratio to epochs (got {epochs!r})")
        return epochs

    @field_validator("epochs")
    @classmethod
    def _epochs(cls, epochs: int | dict[float, int]) -> int | dict[float, int]:
        for ratio, count in (epochs.items() if isinstance(epochs, dict) else [(None, epochs)]):
            if ratio is not None and not 0.0 < ratio <= 1.0:
                raise ValueError(f"a label ratio must be in (0, 1], got {ratio:g}")
            if count < 1:
                raise ValueError(f"must be >= 1 (got {count}{'' if ratio is None else f' for label ratio {ratio:g}'})")
        return epochs

    def epochs_for(self, label_ratio: float) -> int:
        """The epochs a trial at ``label_ratio`` trains for.

        Raises:
            KeyError: per-ratio epochs name no such ratio (the search's checks catch it first).
        """
        if isinstance(self.epochs, int):
            return self.epochs
        for ratio, count in self.epochs.items():
            if same_label_ratio(ratio, label_ratio):
                return count
        raise KeyError(f"train.epochs gives no epochs for label ratio {label_ratio:g}")

    @model_validator(mode="after")
    def _lr_floor(self) -> "TrainConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        return self

    @model_validator(mode="after")
    def _sgd_without_zero(self) -> "TrainConfig":
        # DeepSpeed's ZeRO refuses torch's SGD at engine start ("untested ZeRO Optimizer"); allowed
        # anyway, its steps were not stage 0's on the same batches: refused here, before any trial
        if self.optimizer == "sgd" and self.deepspeed.zero_stage >= 1:
            raise ValueError(f"optimizer sgd runs with deepspeed.zero_stage 0 only (got {self.deepspeed.zero_stage}): "
                             "DeepSpeed's ZeRO does not take torch's SGD; use adamw, or zero_stage 0")
        return self


#: ``train`` fields a ``space`` may search; anything else in ``space`` must be a method option.
SEARCHABLE_TRAIN_FIELDS = ("lr", "weight_decay", "momentum", "warmup_epochs", "layer_decay", "drop_path", "batch_size")


class SchedulerConfig(Strict):
    type: Literal["asha", "hyperband", "median", "none"] = Field(
        "asha",
        description="asha: successive halving at epoch rungs; hyperband: asynchronous HyperBand (several ASHA "
        "brackets of different aggressiveness); median: stop a trial below the median of others at the same epoch; none",
    )
    grace_period: int = Field(1, ge=1, description="epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="asha/hyperband: 1/reduction_factor of trials go on at each rung")
    brackets: int = Field(3, ge=1, description="hyperband: number of brackets")
    min_samples: int = Field(3, ge=1, description="median: trials that must have reached an epoch before any is stopped there")


class ConfirmConfig(Strict):
    """Re-training each study's best configurations with several seeds before one is chosen."""

    top_k: int = Field(3, ge=1, description="the study's best configurations re-trained")
    seeds: int = Field(3, ge=2, description="seeds each is trained with: train.seed, train.seed + 1, ...")


class WarmStartConfig(Strict):
    """Seeding each study with configurations that did well before (tried first, then TPE goes on)."""

    from_leaderboard: bool = Field(
        False,
        description="the best configs of this dataset and backbone at the same label ratio in earlier experiments, "
        "and of this search's already searched (neighbouring) label ratios",
    )
    top_k: int = Field(2, ge=1, description="configurations taken from each source")


class FidSettings(Strict):
    """How a generation trial's samples are drawn and scored (FID) at its rungs and last epoch."""

    images: int = Field(16, ge=2, le=10000, description="fixed validation prompts sampled (one image each), and the "
                        "validation images they are compared with; small sets bias FID upwards, alike for every trial")
    steps: int = Field(20, ge=1, le=1000, description="denoising steps per sample (DDIM)")
    guidance_scale: float = Field(1.0, ge=1.0, description="classifier-free guidance (1: none)")
    at: Literal["rungs", "every_epoch"] = Field(
        "rungs", description="rungs: at the epochs where the scheduler may stop a trial, and the last one (a stopped "
        "trial keeps the FID it was stopped with); every_epoch",
    )


def metric_name(value: Any) -> Any:
    """``search.metric`` may leave out the validation prefix: ``fid`` is ``val_fid``, ``auroc`` ``val_auroc``."""
    if isinstance(value, str) and value not in METRICS and f"val_{value}" in METRICS:
        return f"val_{value}"
    return value


class SearchSettings(Strict):
    num_samples: int = Field(8, ge=1, description="trials per label ratio")
    sampler: Literal["tpe", "random", "cmaes", "gp", "grid"] = Field(
        "tpe", description="tpe (multivariate), random, cmaes, gp (Gaussian process), grid (every combination)"
    )
    seed: int = Field(0, description="seed of the Optuna sampler: the same seed suggests the same points again")
    metric: MetricName = Field("val_auroc", description="the validation metric trials are ranked by (val_ may be left "
                               "out: fid); the default of a generation search is val_fid")
    mode: Literal["max", "min"] | None = Field(
        None, description="the metric's direction ("
        + ", ".join(f"{m.direction} for {m.name}" for m in METRICS.values()) + "); may be given, not changed"
    )
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    max_concurrent: int | None = Field(None, ge=1, description="default: what the cluster's free resources allow")
    checkpoint_trials: int = Field(
        5, ge=0, description="per study and method: the ended trials whose checkpoints stay in storage, the best by "
        "the metric (each its train.checkpoints_to_keep best epochs); the others' are deleted when a better trial "
        "ends (their rows stay). 0 keeps every trial's",
    )
    also_minimize: list[Literal["trainable_params", "train_time_s"]] = Field(
        default_factory=list,
        description="further objectives, minimised while the metric is optimised (multi-objective: Optuna keeps the "
        "Pareto front); trainable_params, or train_time_s (seconds of training per worker: GPU-seconds on GPUs)",
    )
    time_budget_s: float | None = Field(
        None, gt=0, description="wall time after which no new trial starts (split evenly over the label ratios)"
    )
    max_trials: int | None = Field(None, ge=1, description="trials over all label ratios (split evenly over them)")
    points_to_evaluate: list[dict[str, Any]] = Field(
        default_factory=list, description="configurations every study tries first, e.g. [{lr: 0.003, rank: 8}]"
    )
    warm_start: "WarmStartConfig" = Field(default_factory=lambda: WarmStartConfig())
    confirm: ConfirmConfig | None = Field(
        None, description="re-train the top_k configurations with several seeds and choose by their mean; test-score the choice"
    )
    fid_weights: Path | None = Field(
        None, description="generation: the FID Inception-v3 weights (pt_inception-2015-12-05, a local file); without "
        "it FID uses a stand-in feature extractor, fit for tests only",
    )
    fid: FidSettings = Field(default_factory=FidSettings)

    @field_validator("metric", mode="before")
    @classmethod
    def _short_metric(cls, value: Any) -> Any:
        return metric_name(value)

    def fid_epochs(self, epochs: int) -> list[int]:
        """The epochs (1-based) a generation trial of ``epochs`` scores its samples at.

        ``at: rungs``: where the scheduler can stop a trial (ASHA's and HyperBand's rungs,
        grace_period x reduction_factor^k; the median rule's every epoch from the grace period on)
        and the last epoch, so that a stopped trial's row has the FID it was stopped with.
        """
        scheduler = self.scheduler
        if self.fid.at == "every_epoch" or scheduler.type == "median":
            first = 1 if self.fid.at == "every_epoch" else min(scheduler.grace_period, epochs)
            return list(range(first, epochs + 1))
        chosen = {epochs}
        if scheduler.type in ("asha", "hyperband"):
            rung = float(min(scheduler.grace_period, epochs))
            while rung < epochs:
                chosen.add(math.ceil(rung - 1e-9))  # a rung is decided at the first epoch that reaches it
                rung *= scheduler.reduction_factor
        return sorted(chosen)

    @property
    def stopping_metric(self) -> str:
        """What the scheduler stops trials on: the metric, or ``val_loss`` where the metric is not on every epoch."""
        return self.metric if METRICS[self.metric].every_epoch else "val_loss"

    @property
    def resolved_mode(self) -> str:
        """The metric's direction: the one the leaderboard, confirmation and checkpoint retention rank by."""
        return metric_mode(self.metric)

    @property
    def objectives(self) -> tuple[list[str], list[str]]:
        """(metrics, modes) Optuna optimises: the metric, then each ``also_minimize``."""
        return [self.metric, *self.also_minimize], [self.resolved_mode, *["min"] * len(self.also_minimize)]

    @model_validator(mode="after")
    def _objectives(self) -> "SearchSettings":
        if len(set(self.also_minimize)) != len(self.also_minimize):
            raise ValueError("also_minimize: lists an objective twice")
        if self.also_minimize and self.sampler == "cmaes":
            raise ValueError("sampler: cmaes optimises one objective; use tpe, random, gp or grid with also_minimize")
        direction = metric_mode(self.metric)
        if self.mode is not None and self.mode != direction:
            # the leaderboard, `best` and confirmation rank by the metric's own direction; a search
            # optimising the other way would pick the worst trials as its best
            raise ValueError(f"mode: {self.metric} is {'maximised' if direction == 'max' else 'minimised'} "
                             f"(mode {direction}); got {self.mode}")
        return self


#: Ray's own resources, which ``custom_per_worker`` must not name (they have keys or are not per worker).
BUILTIN_RESOURCES = {
    "CPU": "set it with resources.cpus_per_worker",
    "GPU": "set it with resources.gpus_per_worker",
    "memory": "not a per-worker request here; pick a node type with enough memory",
    "object_store_memory": "not a per-worker request here; pick a node type with enough memory",
}


class ResourcesConfig(Strict):
    workers_per_trial: int = Field(1, ge=1, description="data-parallel workers of one trial")
    device_hour_price: float | None = Field(
        None, gt=0, description="what one device-hour (a GPU, or a CPU worker) costs, in any currency: "
        "`search --dry-run` then turns its device-hours into money",
    )
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each worker holds (its data loading and augmentation)")
    gpus_per_worker: float | Literal["auto"] = Field(
        "auto", description="GPUs per worker; fractions share a GPU; auto: 1 if the cluster has or can add GPUs, else 0"
    )

    custom_per_worker: dict[str, Annotated[float, Field(gt=0, allow_inf_nan=False)]] = Field(
        default_factory=dict,
        description="other Ray resources each worker asks for, e.g. {'accelerator_type:A100': 0.001} to pin a GPU model",
    )
    max_failures: int = Field(
        2, ge=-1, description="restarts of a trial from its last checkpoint after a lost worker or node (-1: no limit)"
    )
    worker_start_timeout_s: float = Field(
        1800.0, gt=0, description="how long each start of a trial's workers may wait for resources (new nodes)"
    )
    warm_executors: bool = Field(
        True, description="train trials on long-lived executors that keep imports, data and the pre-trained backbone "
        "loaded (false: every trial is a cold Ray Train run of its own)"
    )
    executor_idle_s: float = Field(
        60.0, gt=0, description="an executor with no trial for this long exits, giving its resources (and node) back; "
        "until then, the driver's next search that fits finds it warm"
    )

    @field_validator("gpus_per_worker")
    @classmethod
    def _gpus(cls, value: float | str) -> float | str:
        if isinstance(value, float) and (value < 0 or (value > 1 and not value.is_integer())):
            raise ValueError("must be 'auto', a fraction in [0, 1] or a whole number of GPUs")
        return value


def _absolute_folder(value: Any) -> Any:
    """A local folder as an absolute path: the manifest keeps it, so a resume from elsewhere finds the same one."""
    return str(Path(value).expanduser().resolve()) if isinstance(value, (str, Path)) else value


def _is_local_folder(uri: str) -> bool:
    """A tracking URI with no scheme, or ``file:``, names a folder on this machine."""
    scheme = uri.partition(":")[0] if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", uri) else ""
    return scheme in ("", "file")


class MlflowTracking(Strict):
    """Each trial an MLflow run, nested under one parent run per study (label ratio)."""

    tracking_uri: str | None = Field(
        None, description="an MLflow server (http://host:5000), a database (sqlite:///path/mlflow.db, "
        "postgresql://...) or a folder (a path or file: URI; it holds an SQLite store, mlflow.db, and the "
        "artifacts); default: $MLFLOW_TRACKING_URI, else the folder mlflow/ in the results folder",
    )
    experiment: str | None = Field(None, description="the MLflow experiment (default: the search's experiment name)")
    log_adapter: bool = Field(
        False, description="at each study's end, its best trial's adapter (the `best --export-adapter` files) as "
        "artifacts of that trial's run, under adapter/",
    )

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, uri: str | None) -> str | None:
        if uri is None:
            return None
        if not uri.strip():
            raise ValueError("must not be empty (leave it out for the default)")
        if _is_local_folder(uri):
            return _absolute_folder(uri.removeprefix("file://").removeprefix("file:"))
        return uri


class WandbTracking(Strict):
    """Each trial a Weights & Biases run, the runs of a study (label ratio) one group."""

    project: str | None = Field(None, description="the W&B project (default: $WANDB_PROJECT, else the search's "
                                "experiment name)")
    entity: str | None = Field(None, description="the W&B team or user (default: $WANDB_ENTITY, else the "
                               "login's default)")
    mode: Literal["online", "offline"] = Field(
        "online", description="online: sent as the search runs (needs WANDB_API_KEY or `wandb login`); offline: "
        "written under dir only, for clusters without internet access (upload later with `wandb sync`)",
    )
    dir: Path | None = Field(None, description="where W&B writes its files, in a wandb/ folder (default: the "
                             "results folder; with cloud results, $WANDB_DIR or the working folder)")
    log_adapter: bool = Field(
        False, description="at each study's end, its best trial's adapter as a W&B model artifact of that trial's run",
    )

    @field_validator("dir", mode="before")
    @classmethod
    def _dir(cls, value: Any) -> Any:
        return _absolute_folder(value)


class TrackingConfig(Strict):
    """Where a search's trials are tracked besides the leaderboard: MLflow, W&B, both or neither."""

    mlflow: MlflowTracking | None = Field(None, description="track in MLflow ({} for every default)")
    wandb: WandbTracking | None = Field(None, description="track in Weights & Biases ({} for every default)")

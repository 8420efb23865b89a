"""One trial's complete configuration: what its workers train, the leaderboard stores and ``train`` re-runs."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from medpeft_ray.config.sections import (
    DatasetConfig,
    FidSettings,
    MethodConfig,
    ModelConfig,
    TrainConfig,
    check_experiment_name,
)
from medpeft_ray.models.families import require_family
from medpeft_ray.metrics import MetricName, metric_mode
from medpeft_ray.schema import Strict


class TrialFid(FidSettings):
    """A generation trial's sampling and FID: the search's settings, its weights and the epochs FID is computed at."""

    weights: Path | None = None
    epochs: list[int] = Field(default_factory=list, description="epochs (1-based) whose samples are scored")


class TrialConfig(Strict):
    """Everything one trial's workers need; the leaderboard stores it and ``train`` re-runs it."""

    experiment: str
    label_ratio: float = Field(gt=0, le=1)
    dataset: DatasetConfig
    model: ModelConfig
    method: MethodConfig
    train: TrainConfig
    metric: MetricName = Field(
        "val_auroc", description="the validation metric that picks the trial's best epoch (the search's search.metric)"
    )
    fid: TrialFid | None = Field(None, description="generation trials: sampling and FID")

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, name: str) -> str:
        return check_experiment_name(name)  # type: ignore[return-value]

    @field_validator("method")
    @classmethod
    def _one_method(cls, method: MethodConfig) -> MethodConfig:
        if method.is_choice:
            raise ValueError("name: a trial trains one method, not a list")
        return method

    @field_validator("train")
    @classmethod
    def _one_budget(cls, train: TrainConfig) -> TrainConfig:
        if isinstance(train.epochs, dict):  # a search's per-ratio epochs: its trial_config picks the trial's
            raise ValueError("epochs: a trial trains one number of epochs, not one per label ratio")
        return train

    @property
    def generation(self) -> bool:
        """Whether the trial fine-tunes a diffusion U-Net (text-to-image) rather than a classifier."""
        return require_family(self.model.backbone).task == "generation"

    @property
    def family(self) -> str:
        return require_family(self.model.backbone).name

    @property
    def mode(self) -> str:
        """``max`` or ``min``: which way ``metric`` is better."""
        return metric_mode(self.metric)

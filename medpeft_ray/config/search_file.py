"""The whole search YAML as one typed object."""

from __future__ import annotations

from functools import cached_property
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from medpeft_ray.config.distributions import Distribution
from medpeft_ray.config.sections import (
    DatasetConfig,
    MethodConfig,
    ModelConfig,
    ResourcesConfig,
    SearchSettings,
    TrackingConfig,
    TrainConfig,
    check_experiment_name,
)
from medpeft_ray.config.space import SearchSpace
from medpeft_ray.config.trial import TrialConfig
from medpeft_ray.schema import Strict

#: the experiment name of a search given as a mapping with none (a file's is its stem)
DEFAULT_EXPERIMENT = "search"


class SearchConfig(Strict):
    """The whole search-space YAML."""

    experiment: str | None = Field(None, description="name of the search (default: the YAML file's stem)")
    task: Literal["classification", "generation"] = Field(
        "classification", description="classification (a timm backbone and labels), or generation: text-to-image "
        "fine-tuning of a diffusion U-Net (model.backbone unet_tiny, unet_sd15) on images with captions, scored by FID",
    )
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    space: dict[str, dict[str, Any]] | None = Field(
        None, description="searched hyperparameters (default: the method's default ranges)"
    )
    train: TrainConfig = Field(default_factory=TrainConfig)
    search: SearchSettings = Field(default_factory=SearchSettings)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, name: str | None) -> str | None:
        return check_experiment_name(name)

    @model_validator(mode="after")
    def _generation_metric(self) -> "SearchConfig":
        # a generation search ranks by FID unless it says otherwise (classification's default means nothing there)
        if self.task == "generation" and "metric" not in self.search.model_fields_set:
            self.search = self.search.model_copy(update={"metric": "val_fid"})
        return self

    @cached_property
    def search_space(self) -> SearchSpace:
        """The searched parameters, built once (pydantic leaves cached properties out of dumps and ``==``)."""
        return SearchSpace(self)

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> "SearchConfig":
        copied = super().model_copy(update=update, deep=deep)
        # the space is derived from the fields an update may change: the copy builds its own
        copied.__dict__.pop("search_space", None)
        return copied

    @property
    def experiment_name(self) -> str:
        """The search's name in folders, the leaderboard and Optuna's studies."""
        return self.experiment or DEFAULT_EXPERIMENT

    def run_name(self, label_ratio: float, confirmation: bool = False) -> str:
        """The Tune run (and folder) of the study of ``label_ratio``, or of its confirmation."""
        return f"{self.experiment_name}-ratio{label_ratio:g}" + ("-confirm" if confirmation else "")

    def study_name(self, label_ratio: float, run_stamp: str) -> str:
        """The Optuna study of ``label_ratio`` in the run started at ``run_stamp``."""
        return f"{self.run_name(label_ratio)}-{run_stamp}"

    # The space's views, for callers that hold the config.

    def distributions(self) -> dict[str, Distribution]:
        """The searched parameters, parsed; see :attr:`SearchSpace.distributions`."""
        return self.search_space.distributions

    def raw_space(self) -> dict[str, dict[str, Any]]:
        """The searched parameters before parsing; see :attr:`SearchSpace.raw`."""
        return self.search_space.raw

    def split_param(self, name: str) -> tuple[str | None, str]:
        """(method, field) of a searched name; see :meth:`SearchSpace.scope`."""
        return self.search_space.scope(name)

    def trial_config(self, label_ratio: float, sampled: dict[str, Any]) -> TrialConfig:
        """The complete configuration of one trial; see :meth:`SearchSpace.trial_config`."""
        return self.search_space.trial_config(label_ratio, sampled)

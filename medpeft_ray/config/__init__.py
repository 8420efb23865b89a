"""The search-space YAML: typed schema, validation with messages that name the key, trial configs.

``load_search_config(path)`` validates the whole file (structure, ranges, method and dataset
options, searched parameters, paths) without importing torch or Ray, and raises
:class:`ConfigError` as ``<file>: <key.path>: <message>``. A search turns it into one
:class:`TrialConfig` per trial, which is all a worker ever sees.

- :mod:`.sections`: the YAML's sections, each checking what it alone decides;
- :mod:`.distributions`: searched parameters' distributions;
- :mod:`.space`: :class:`SearchSpace`, the searched parameters of one search, built once;
- :mod:`.trial` and :mod:`.search_file`: one trial's config, and the whole search file;
- :mod:`.checks`: checks that span sections; :mod:`.loading`: reading files.
"""

# Importing the packages registers the built-in methods and datasets that validation looks up.
import medpeft_ray.data  # noqa: F401  isort: skip
import medpeft_ray.methods  # noqa: F401  isort: skip

from medpeft_ray.config.distributions import (  # noqa: E402
    CategoricalDistribution,
    Distribution,
    FloatDistribution,
    IntDistribution,
    distribution_contains,
    grid_points,
)
from medpeft_ray.config.loading import load_search_config, load_trial_config, validate_search_dict  # noqa: E402
from medpeft_ray.config.search_file import DEFAULT_EXPERIMENT, SearchConfig  # noqa: E402
from medpeft_ray.config.sections import (  # noqa: E402
    METHOD_PARAM,
    SEARCHABLE_TRAIN_FIELDS,
    ConfirmConfig,
    DatasetConfig,
    DeepSpeedConfig,
    MethodConfig,
    ModelConfig,
    ResourcesConfig,
    SchedulerConfig,
    SearchSettings,
    TrackingConfig,
    TrainConfig,
    WarmStartConfig,
)
from medpeft_ray.config.space import SearchSpace  # noqa: E402
from medpeft_ray.config.trial import TrialConfig  # noqa: E402
from medpeft_ray.schema import parse_section  # noqa: E402

__all__ = [
    "CategoricalDistribution", "ConfirmConfig", "DatasetConfig", "DeepSpeedConfig", "Distribution",
    "DEFAULT_EXPERIMENT", "FloatDistribution", "IntDistribution", "METHOD_PARAM", "MethodConfig", "ModelConfig",
    "ResourcesConfig", "SEARCHABLE_TRAIN_FIELDS", "SchedulerConfig", "SearchConfig", "SearchSettings", "SearchSpace",
    "TrackingConfig", "TrainConfig", "TrialConfig", "WarmStartConfig", "distribution_contains", "grid_points", "load_search_config",
    "load_trial_config", "parse_section", "validate_search_dict",
]

"""Pre-flight: what a search checks on this machine before any Ray work, and the facts it reports.

Backbone name, pre-trained checkpoint (or pipeline folder), FID weights, the dataset (decoded once
into its cache here, so that trials on this machine only read it), the search metric on this
data, and each method applied to the backbone on the meta device (no memory, no weights).
``medpeft-ray search --dry-run`` runs exactly this, without Ray.
"""

from __future__ import annotations

from typing import Any

import torch

from medpeft_ray import data
from medpeft_ray.config import SearchConfig
from medpeft_ray.errors import ConfigError, DataError, MedpeftError
from medpeft_ray.methods import count_parameters, prepare_model
from medpeft_ray.metrics import METRICS, require_defined
from medpeft_ray.models import build_backbone
from medpeft_ray.models.backbones import check_backbone_name
from medpeft_ray.models.checkpoints import checkpoint_identity, match_checkpoint
from medpeft_ray.models.normalisation import input_statistics
from medpeft_ray.models.unet import check_pipeline_folder, pipeline_weights
from medpeft_ray.train.engine import augment_processes_override
from medpeft_ray.train.fid import check_fid_weights


def preflight(config: SearchConfig) -> dict[str, Any]:
    """Checks what needs torch before any Ray work: backbone name, checkpoint, data, method on the backbone.

    Builds the dataset's decode-once cache on this machine (later trials here only read it) and
    the model on the meta device (no memory, no weights), with the method applied.

    Returns:
        facts for the progress line (classes, images per split and ratio, trainable params) and
        the dataset's cache key, which trials reuse instead of walking the dataset again, and
        the pre-trained checkpoint's path and SHA-256.
    """
    augment_processes_override()  # a worker would read it only once its trial starts
    backbone = config.model.backbone
    try:
        check_backbone_name(backbone)
    except ConfigError as exc:
        raise exc.with_file(config.experiment or "") from None
    checkpoint = None
    generation = config.task == "generation"
    if config.model.checkpoint is not None and generation:
        check_pipeline_folder(config.model.checkpoint)  # every part there, before any worker reads one
        checkpoint = checkpoint_identity(pipeline_weights(config.model.checkpoint))
    elif config.model.checkpoint is not None:
        # the workers' own check, on a meta model: a file of another model stops here, not in a trial
        # (the head does not take part, so its size does not matter yet)
        with torch.device("meta"):
            bare = build_backbone(backbone, 1, config.dataset.image_size)
        match_checkpoint(bare, config.model.checkpoint)
        checkpoint = checkpoint_identity(config.model.checkpoint)
    if config.search.fid_weights is not None:
        check_fid_weights(config.search.fid_weights)

    ds = config.dataset
    key = data.dataset_key(ds.name, ds.root, ds.image_size, ds.options, ds.seed)
    splits = data.load_splits(ds.name, ds.root, ds.image_size, ds.options, ds.seed, key=key)
    for name in ("train", "val"):
        if len(getattr(splits, name)) == 0:
            raise MedpeftError(f"{ds.root or ds.name}: the {name} split has no images")
    if generation and not splits.has_captions:
        raise DataError(f"{ds.root or ds.name}: dataset {ds.name!r} has no captions; a generation search needs images "
                        "with their report text (mimic_cxr, captions, synthetic)")
    for metric in config.search.objectives[0]:  # accuracy has no meaning on multi-label data, say
        if metric in METRICS:  # also_minimize may name a cost column
            require_defined(metric, "generation" if generation else splits.task, ds.name)
    images_per_ratio = {r: len(data.train_subset_index(splits, r, ds.seed)) for r in ds.label_ratios}

    # Each method is applied with the first value of each searched option, to catch options that
    # do not fit this backbone (a block index past its depth, say) before trials start.
    space = config.search_space
    trainable_by_method: dict[str, int] = {}
    for method in space.methods:
        trial = space.trial_config(ds.label_ratios[0], space.first_point(method))
        with torch.device("meta"):
            model = build_backbone(backbone, splits.num_classes, ds.image_size, drop_path=trial.train.drop_path)
            try:
                model = prepare_model(model, trial.method.name, trial.method.options, trial.family)
            except ValueError as exc:
                raise ConfigError(config.method.options_key(method), str(exc), config.experiment) from None
        trainable_by_method[method], total = count_parameters(model)
    trainable = max(trainable_by_method.values())
    return {
        "classes": splits.num_classes,
        "images": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "train_images_per_ratio": images_per_ratio,
        "trainable_params": trainable,
        "trainable_params_by_method": trainable_by_method,
        "total_params": total,
        "dataset_key": key,
        "skipped": list(splits.skipped),
        "channels": splits.channels,
        "normalisation": input_statistics(config.model).describe(),
        "checkpoint": checkpoint,  # {path, sha256} of the pre-trained weights, or None
        # what warm executors build while they set up (data, pristine backbone, the method's imports)
        "warm_up": space.trial_config(ds.label_ratios[0], space.first_point(space.methods[0])),
    }

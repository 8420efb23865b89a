"""Exports of a leaderboard trial: its config as a re-runnable YAML, and its trained adapter.

``best.yaml`` is the trial's :class:`~medpeft_ray.config.TrialConfig` (what its workers ran), so
``medpeft-ray train --config best.yaml`` runs it again as is. The adapter export copies the
trial's best checkpoint (trainable weights, state, and peft's adapter folder for peft methods),
from the results folder or from cloud storage (``s3://``, ``gs://``, read as Ray reads it), and,
where the method folds into the backbone, writes the merged plain timm weights.

Printing a configuration (``medpeft-ray best``) needs no model: torch, the methods and the models
are imported inside the functions that rebuild one, so that only writing an adapter pays for them.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import ValidationError
from safetensors import safe_open

from medpeft_ray.config import TrialConfig
from medpeft_ray.errors import MedpeftError
from medpeft_ray.methods.export import ADAPTER_NAME
from medpeft_ray.metrics import get_metric
from medpeft_ray.samples import SAMPLE_SEED, SAMPLES_FILE
from medpeft_ray.storage import download, is_uri
from medpeft_ray.train.checkpoint import PEFT_DIR, STATE_FILE, WEIGHTS_FILE, load_checkpoint_into

MERGED_FILE = "model.safetensors"
MANIFEST_FILE = "export.json"
CONFIG_FILE = "config.yaml"


def _trial_name(row: Mapping[str, Any]) -> str:
    return f"trial {row['trial_id']} of experiment {row['experiment']!r}"


def trial_config(row: Mapping[str, Any]) -> TrialConfig:
    """The row's stored config as a validated :class:`TrialConfig`.

    Raises:
        MedpeftError: the stored config does not validate under this version of medpeft-ray.
    """
    try:
        return TrialConfig.model_validate(row["config"])
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "config"
        raise MedpeftError(
            f"{_trial_name(row)}: its stored config does not validate here ({key}: {first['msg']})"
        ) from None


def _one_line(value: Any) -> str:
    return " ".join(str(value).split())


def best_config_yaml(row: Mapping[str, Any], metric: str = "val_auroc") -> str:
    """The trial's config as YAML, after a comment naming the experiment, trial, metric and checkpoint."""
    config = trial_config(row).model_dump(mode="json")
    value = row.get(metric)
    known = isinstance(value, float) and value == value
    score = f"{metric} {get_metric(metric).format(value)}" if known else f"no {metric}"
    epochs = ""
    if row.get("best_epoch") is not None:
        epochs = f" (epoch {row.get('best_epoch')} of {row.get('epochs_run')} run)"
    trainable = row.get("trainable_params")
    cost = f", {int(trainable):,} trainable parameters" if trainable is not None and trainable == trainable else ""
    header = [
        f"# medpeft-ray: best {row['method']} on {row['dataset']} at label ratio {row['label_ratio']:g}",
        f"# experiment {_one_line(row['experiment'])}, trial {_one_line(row['trial_id'])}, status {row['status']}",
        f"# {score}{epochs}{cost}",
        f"# checkpoint: {_one_line(row.get('checkpoint') or 'none recorded')}",
        "# run it again: medpeft-ray train --config <this file>",
    ]
    return "\n".join(header) + "\n" + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


def write_best_yaml(row: Mapping[str, Any], path: str | Path, metric: str = "val_auroc") -> Path:
    """Writes :func:`best_config_yaml` to ``path`` (its folder is created); returns the path."""
    path = Path(path)
    text = best_config_yaml(row, metric)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@dataclass
class AdapterExport:
    """What :func:`export_adapter` wrote."""

    directory: Path
    files: list[str] = field(default_factory=list)
    peft: bool = False  # peft's adapter folder is in ``peft/``
    merged: bool = False  # ``model.safetensors`` holds the merged plain timm weights
    num_classes: int | None = None
    class_names: list[str] = field(default_factory=list)
    note: str = ""


def _checkpoint_folder(row: Mapping[str, Any], scratch: Path) -> Path:
    """The row's checkpoint folder on this machine: the folder itself, or for a checkpoint in cloud
    storage (a search with ``--results s3://...``), what the export reads of it copied into ``scratch``."""
    checkpoint = row.get("checkpoint")
    if not checkpoint:
        raise MedpeftError(f"{_trial_name(row)}: no checkpoint recorded (status {row['status']})")
    if is_uri(checkpoint):
        # Only the files the export uses: DeepSpeed's folder (the whole module and optimizer
        # state, for resuming) can be many times their size.
        try:
            copied = download(str(checkpoint), scratch, [WEIGHTS_FILE, STATE_FILE, PEFT_DIR, "samples.npy"])
        except OSError as exc:  # pyarrow's errors from the storage: credentials, network, permissions
            raise MedpeftError(f"{checkpoint}: cannot read the trial's checkpoint ({exc})") from None
        if WEIGHTS_FILE not in copied:
            raise MedpeftError(f"{checkpoint}: the trial's checkpoint folder is missing or has no {WEIGHTS_FILE}")
        return scratch
    folder = Path(checkpoint)
    if not (folder / WEIGHTS_FILE).is_file():
        raise MedpeftError(f"{folder}: the trial's checkpoint folder is missing or has no {WEIGHTS_FILE}")
    return folder


def _num_classes(folder: Path, family: str, state: dict[str, Any]) -> int:
    """Classes of the trained head: from its weight's shape, else from the state's per-class AUROCs."""
    head = "head.weight" if family == "vit" else "fc.weight"
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as weights:
        if head in weights.keys():
            return int(weights.get_slice(head).get_shape()[0])
    per_class = state.get("val_auroc_per_class") or {}
    if per_class:
        return len(per_class)
    raise MedpeftError(f"{folder}: cannot tell the number of classes (no {head} and no per-class AUROCs)")


def export_adapter(row: Mapping[str, Any], directory: str | Path, metric: str = "val_auroc") -> AdapterExport:
    """Writes the trial's trained adapter to ``directory`` (from a local or a cloud storage checkpoint).

    Always: ``trainable.safetensors`` and ``state.json`` (the checkpoint), ``config.yaml`` (the
    trial's config) and ``export.json`` (what was written, classes, how to load it). For peft
    methods: ``peft/`` in peft's adapter format. For mergeable methods: ``model.safetensors``,
    the state dict of the merged timm model (``build_backbone(backbone, num_classes, image_size)``
    loads it strictly).
    """
    config = trial_config(row)
    with tempfile.TemporaryDirectory(prefix="medpeft-export-") as scratch:
        return _export_from(row, config, _checkpoint_folder(row, Path(scratch)), Path(directory), metric)


def _export_from(row: Mapping[str, Any], config: TrialConfig, source: Path, out: Path, metric: str) -> AdapterExport:
    """:func:`export_adapter` from the checkpoint folder ``source`` on this machine."""
    from medpeft_ray.methods import get_method

    if out.resolve() == source.resolve():
        raise MedpeftError(f"{out}: is the checkpoint itself; export to another folder")
    out.mkdir(parents=True, exist_ok=True)
    result = AdapterExport(out)
    for name in (WEIGHTS_FILE, STATE_FILE):
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
            result.files.append(name)
    if (source / PEFT_DIR).is_dir():
        shutil.copytree(source / PEFT_DIR, out / PEFT_DIR, dirs_exist_ok=True)
        result.files.append(PEFT_DIR + "/")
        result.peft = True
    write_best_yaml(row, out / CONFIG_FILE, metric)
    result.files.append(CONFIG_FILE)

    state = json.loads((source / STATE_FILE).read_text()) if (source / STATE_FILE).is_file() else {}
    spec = get_method(config.method.name)
    if config.generation:
        return _export_generation(row, config, source, out, metric, result)
    result.class_names = list(state.get("val_auroc_per_class") or {})
    result.num_classes = _num_classes(source, config.family, state)
    refused = _write_merged(config, source, out / MERGED_FILE, result.num_classes) if spec.merge is not None else None
    if spec.merge is not None and refused is None:
        result.files.append(MERGED_FILE)
        result.merged = True
    elif refused is not None:
        result.note = f"no merged model: {refused}"  # these options add what no timm weight can absorb
    else:
        result.note = f"{config.method.name} adds computation that cannot be folded into the backbone: no merged model"
    manifest = {
        "experiment": row["experiment"], "trial_id": row["trial_id"], "method": config.method.name,
        "backbone": config.model.backbone, "image_size": config.dataset.image_size,
        "num_classes": result.num_classes, "class_names": result.class_names, "metric": metric,
        "value": row.get(metric), "files": result.files, "merged": result.merged, "peft": result.peft,
        "source": str(row["checkpoint"]),  # the folder or URI the leaderboard names
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, default=str))
    result.files.append(MANIFEST_FILE)
    return result


#: an exported LoRA of a U-Net, in diffusers' format: ``pipeline.load_lora_weights(<export>/lora)`` loads it
DIFFUSERS_LORA_DIR = "lora"
#: a merged U-Net, in diffusers' format: ``UNet2DConditionModel.from_pretrained(<export>, subfolder="unet")``
MERGED_UNET_DIR = "unet"


def _tuned_unet(config: TrialConfig, source: Path) -> Any:
    """The trial's U-Net rebuilt: its pipeline's pre-trained U-Net, the method applied, the checkpoint loaded."""
    from medpeft_ray.methods import prepare_model
    from medpeft_ray.models import build_backbone

    pretrained = config.model.checkpoint
    if pretrained is not None and not Path(pretrained).is_dir():
        raise MedpeftError(f"{pretrained}: the trial's pipeline folder (model.checkpoint) is not on this machine; the "
                           "exported U-Net is built from it")
    model = build_backbone(config.model.backbone, 0, config.dataset.image_size, checkpoint=pretrained)
    model = prepare_model(model, config.method.name, config.method.options, config.family)
    try:
        load_checkpoint_into(source, model)
    except ValueError as exc:
        raise MedpeftError(f"{source}: does not fit the trial's U-Net ({exc})") from None
    return model.eval()


def _save_diffusers_lora(model: Any, folder: Path) -> None:
    """Saves the U-Net's LoRA as diffusers saves one, with the trial's LoRA config beside the weights.

    The config (rank, alpha, rslora, targets) goes into the safetensors metadata, which diffusers'
    ``load_lora_weights`` builds its LoRA from: without it diffusers takes alpha = rank, a scaling of
    1 where the trial trained at alpha / r (or alpha / sqrt r), and the loaded U-Net is not the trained one.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True,
                                              unet_lora_adapter_metadata=model.peft_config[ADAPTER_NAME].to_dict())


def _export_generation(row: Mapping[str, Any], config: TrialConfig, source: Path, out: Path, metric: str,
                       result: AdapterExport) -> AdapterExport:
    """A generation trial's export: a LoRA in diffusers' format, and the merged U-Net of a mergeable method.

    ``export.json`` names the pipeline folder they belong to (``model.checkpoint``, or the built-in
    pipeline's folder), the prompts and seeds of the trial's samples, and ``samples.npy`` holds them.
    """
    import torch

    from medpeft_ray.methods import get_method, merge_method
    from medpeft_ray.models.unet import pipeline_folder

    spec = get_method(config.method.name)
    model = _tuned_unet(config, source)
    if config.method.name == "lora":
        _save_diffusers_lora(model, out / DIFFUSERS_LORA_DIR)
        result.files.append(DIFFUSERS_LORA_DIR + "/")
    if spec.merge is not None:
        with torch.no_grad():
            merged = merge_method(model, config.method.name)
        merged.save_pretrained(out / MERGED_UNET_DIR, safe_serialization=True)
        result.files.append(MERGED_UNET_DIR + "/")
        result.merged = True
    else:
        result.note = f"{config.method.name} adds computation that cannot be folded into the U-Net: no merged U-Net"
    if (source / SAMPLES_FILE).is_file():
        shutil.copy2(source / SAMPLES_FILE, out / SAMPLES_FILE)
        result.files.append(SAMPLES_FILE)
    state = json.loads((source / STATE_FILE).read_text()) if (source / STATE_FILE).is_file() else {}
    details = json.loads((state.get("metrics") or {}).get("details") or "{}")
    manifest = {
        "experiment": row["experiment"], "trial_id": row["trial_id"], "method": config.method.name,
        "backbone": config.model.backbone, "image_size": config.dataset.image_size, "metric": metric,
        "value": row.get(metric), "files": result.files, "merged": result.merged, "peft": result.peft,
        "pipeline": str(pipeline_folder(config.model.backbone, config.model.checkpoint, config.dataset.image_size)),
        "prompts": details.get("prompts", []), "sample_seed": SAMPLE_SEED,
        "sampling": config.fid.model_dump(mode="json", exclude={"weights", "epochs"}) if config.fid else None,
        "source": str(row["checkpoint"]),
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, default=str))
    result.files.append(MANIFEST_FILE)
    return result


def _write_merged(config: TrialConfig, source: Path, target: Path, num_classes: int) -> str | None:
    """Rebuilds the tuned model from the pre-trained weights and the checkpoint, merges, saves.

    Returns why the trial's options cannot be merged (SSF's final scale-shift before a pooled
    LayerNorm, say) instead of writing anything, or None once written.
    """
    import torch
    from safetensors.torch import save_file

    from medpeft_ray.methods import merge_method, prepare_model
    from medpeft_ray.models import build_backbone
    from medpeft_ray.train.recipe import BACKBONE_INIT_SEED

    pretrained = config.model.checkpoint
    if pretrained is not None and not Path(pretrained).is_file():
        raise MedpeftError(f"{pretrained}: the trial's pre-trained weights (model.checkpoint) are not on this "
                           "machine; the merged model is built from them")
    # frozen weights that were not pre-trained are the recipe's draw, at its fixed seed whatever the
    # trial's seed (the head and the method's weights come from the checkpoint; VeRA's projections
    # from their own saved key)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BACKBONE_INIT_SEED)
        model = build_backbone(config.model.backbone, num_classes, config.dataset.image_size, checkpoint=pretrained,
                               drop_path=config.train.drop_path)
    model = prepare_model(model, config.method.name, config.method.options, config.family)
    try:
        load_checkpoint_into(source, model)
    except ValueError as exc:
        raise MedpeftError(f"{source}: does not fit the trial's model ({exc})") from None
    model.eval()
    with torch.no_grad():
        try:
            merged = merge_method(model, config.method.name)
        except ValueError as exc:
            return str(exc)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in merged.state_dict().items()}
    metadata = {"backbone": config.model.backbone, "num_classes": str(num_classes),
                "image_size": str(config.dataset.image_size)}
    save_file(state, str(target), metadata=metadata)
    return None

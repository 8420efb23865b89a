"""timm backbones and the loading of local pre-trained checkpoints (MAE/MRM ``.pth``, timm files).

Nothing is downloaded: weights come from a local file named in ``model.checkpoint`` or the model
starts from random initialisation.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from medpeft_ray.errors import MedpeftError

if TYPE_CHECKING:
    import torch
    from torch import nn

_FAMILIES = (("vit", re.compile(r"^(vit|deit3?)_")), ("resnet", re.compile(r"^(resnet|resnetv2_|wide_resnet)")))


def backbone_family(name: str) -> str | None:
    """``vit`` or ``resnet`` from a timm model name, without importing timm; None if neither."""
    for family, pattern in _FAMILIES:
        if pattern.match(name):
            return family
    return None


def check_backbone_name(name: str) -> None:
    """Raises :class:`ConfigError` (key ``model.backbone``) unless timm knows ``name`` as a ViT or ResNet."""
    import difflib

    import timm

    from medpeft_ray.errors import ConfigError

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError("model.backbone", f"unknown timm model {name!r}{hint}")
    if backbone_family(name) is None:
        raise ConfigError("model.backbone", f"{name!r} is not a supported timm ViT (vit_*, deit_*) or ResNet (resnet*) name")


def build_backbone(
    name: str,
    num_classes: int,
    image_size: int,
    checkpoint: str | Path | None = None,
    drop_path: float = 0.0,
) -> "nn.Module":
    """A timm classifier with a fresh ``num_classes`` head, optionally initialised from ``checkpoint``.

    ViTs use global average pooling of patch tokens, then ``fc_norm`` and ``head`` (as in MED-PEFT),
    and are built for ``image_size`` (position embeddings of a checkpoint are resized to it).
    """
    import timm

    family = backbone_family(name)
    kwargs: dict = {"num_classes": num_classes, "drop_path_rate": drop_path}
    if family == "vit":
        kwargs.update(img_size=image_size, global_pool="avg")
    else:
        # timm zeroes each residual branch's last BatchNorm scale; in a frozen backbone without
        # pre-trained weights that would block every gradient to adapters inside the branches
        kwargs.update(zero_init_last=False)
    model = timm.create_model(name, pretrained=False, **kwargs)
    if checkpoint is not None:
        load_checkpoint(model, Path(checkpoint))
    return model


def read_state_dict(path: Path) -> dict[str, "torch.Tensor"]:
    """Reads the weights of a ``.pth``/``.pt``/``.bin`` or ``.safetensors`` file.

    MAE/MRM checkpoints keep the weights under ``"model"``; some files use ``"state_dict"``; a raw
    dict is taken as is. DDP's ``module.`` prefix is removed.
    """
    import torch

    if not path.is_file():
        raise MedpeftError(f"{path}: checkpoint file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            try:
                raw = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001
                # MAE/MRM files also pickle their argparse Namespace; only the user's own file
                # is read this way.
                raw = torch.load(path, map_location="cpu", weights_only=False)
            state = raw
            for key in ("model", "state_dict"):
                if isinstance(raw, dict) and isinstance(raw.get(key), dict):
                    state = raw[key]
                    break
    except MedpeftError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise MedpeftError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise MedpeftError(f"{path}: no tensor state dict found in the checkpoint")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_checkpoint(model: "nn.Module", path: Path) -> tuple[list[str], list[str]]:
    """Loads a pre-trained checkpoint into ``model`` the way MED-PEFT does.

    The head is dropped when its shape differs and re-initialised (trunc normal, std 2e-5),
    ``pos_embed`` is resized bicubically to the model's grid, loading is non-strict.

    Returns:
        (missing, unexpected) key lists of the non-strict load.
    """
    import torch
    from timm.layers import resample_abs_pos_embed

    state = read_state_dict(path)
    own = model.state_dict()
    for key in [k for k in state if k.startswith(("head.", "fc.")) and k in own and state[k].shape != own[k].shape]:
        del state[key]
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        prefix = getattr(model, "num_prefix_tokens", 1)
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], new_size=model.patch_embed.grid_size, num_prefix_tokens=prefix
        )
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise MedpeftError(f"{path}: does not fit the backbone ({str(exc).splitlines()[0]})") from exc
    head = getattr(model, "head", None)
    if isinstance(head, torch.nn.Linear):
        torch.nn.init.trunc_normal_(head.weight, std=2e-5)
        torch.nn.init.zeros_(head.bias)
    return list(result.missing_keys), list(result.unexpected_keys)


def head_parameters(model: "nn.Module", family: str) -> Iterator["torch.nn.Parameter"]:
    """The classifier's parameters: ViT ``head`` and ``fc_norm``, ResNet ``fc``."""
    names = ("head", "fc_norm") if family == "vit" else ("fc",)
    for name in names:
        module = getattr(model, name, None)
        if module is not None:
            yield from module.parameters()

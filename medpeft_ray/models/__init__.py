"""Backbones (timm), their families and checkpoint loading.

The families' registry is read without torch (the config checks backbone names, the CLI lists
them): torch, timm, safetensors and diffusers are imported inside the functions that build a model
or read a checkpoint.
"""

# Each family's module registers it; ViT first, as messages list the families in that order.
from medpeft_ray.models import vit  # noqa: F401  isort: skip
from medpeft_ray.models import resnet  # noqa: F401  isort: skip
from medpeft_ray.models import unet  # noqa: F401  isort: skip
from medpeft_ray.models.backbones import backbone_family, build_backbone, head_parameters, load_checkpoint
from medpeft_ray.models.families import BackboneFamily, family_of, get_family, list_families, register_family

__all__ = ["BackboneFamily", "backbone_family", "build_backbone", "family_of", "get_family", "head_parameters",
           "list_families", "load_checkpoint", "register_family"]

"""Backbones (timm) and checkpoint loading."""

from medpeft_ray.models.backbones import backbone_family, build_backbone, head_parameters, load_checkpoint

__all__ = ["backbone_family", "build_backbone", "head_parameters", "load_checkpoint"]

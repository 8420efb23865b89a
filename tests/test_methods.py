"""Every registered method on a small ViT: exactly the intended parameters train, forward/backward work."""

from __future__ import annotations

import re

import pytest
import torch

from medpeft_ray.methods import count_parameters, get_method, list_methods, prepare_model
from medpeft_ray.models import build_backbone

BACKBONE = "vit_tiny_patch16_224"

#: method -> (regex every trainable name must match, regex some trainable name must match)
EXPECTED_TRAINABLE = {
    "full": (r".*", r"^blocks\.0\.attn\.qkv\.weight$"),
    "linear": (r"^(head|fc_norm)\.", r"^head\.weight$"),
    "bitfit": (r"(\.bias$|^head\.|^fc_norm\.)", r"^blocks\.3\.mlp\.fc1\.bias$"),
    "lora": (r"(\.lora_[AB]\.default\.weight$|^head\.|^fc_norm\.)", r"^blocks\.11\.attn\.qkv\.lora_A\.default\.weight$"),
}


def small_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone(BACKBONE, num_classes=3, image_size=32)


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_every_vit_method_has_expectations() -> None:
    # a newly registered ViT method must be added to the table above, so it is tested
    assert set(list_methods("vit")) == set(EXPECTED_TRAINABLE)


@pytest.mark.parametrize("method", sorted(EXPECTED_TRAINABLE))
def test_exactly_intended_parameters_train(method: str) -> None:
    model = prepare_model(small_vit(), method, {}, "vit")
    names = trainable_names(model)
    every, some = EXPECTED_TRAINABLE[method]
    assert names, "nothing trains"
    assert all(re.search(every, n) for n in names), [n for n in names if not re.search(every, n)][:5]
    assert any(re.search(some, n) for n in names)
    # the head always trains
    assert {"head.weight", "head.bias"} <= set(names)
    trainable, total = count_parameters(model)
    assert 0 < trainable <= total
    if method != "full":
        assert trainable < total / 10


@pytest.mark.parametrize("method", sorted(EXPECTED_TRAINABLE))
def test_forward_backward_reaches_only_trainable(method: str) -> None:
    model = prepare_model(small_vit(), method, {}, "vit")
    x = torch.randn(2, 3, 32, 32)
    loss = model(x).sum()
    loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
        else:
            assert param.grad is None, name


def test_lora_leaves_output_unchanged_at_init() -> None:
    base = small_vit()
    x = torch.randn(2, 3, 32, 32)
    base.eval()
    before = base(x)
    adapted = prepare_model(base, "lora", {"rank": 4}, "vit").eval()
    torch.testing.assert_close(adapted(x), before)


def test_lora_block_and_target_selection() -> None:
    model = prepare_model(small_vit(), "lora", {"rank": 2, "blocks": [0, 5], "targets": ["qkv", "fc2"]}, "vit")
    adapted = {n.split(".lora_")[0] for n in trainable_names(model) if ".lora_" in n}
    assert adapted == {"blocks.0.attn.qkv", "blocks.0.mlp.fc2", "blocks.5.attn.qkv", "blocks.5.mlp.fc2"}
    rank = model.blocks[0].attn.qkv.lora_A["default"].weight.shape[0]
    assert rank == 2


def test_lora_block_out_of_range_is_an_error() -> None:
    with pytest.raises(ValueError, match="out of range"):
        prepare_model(small_vit(), "lora", {"blocks": [12]}, "vit")


def test_method_on_wrong_family_is_an_error() -> None:
    with pytest.raises(ValueError, match="does not apply to resnet"):
        prepare_model(small_vit(), "lora", {}, "resnet")


def test_unknown_method_lists_known_ones() -> None:
    with pytest.raises(KeyError, match="known: .*lora"):
        get_method("lorra")


def test_resnet_selective_methods() -> None:
    model = build_backbone("resnet18", num_classes=2, image_size=32)
    model = prepare_model(model, "bitfit", {}, "resnet")
    names = trainable_names(model)
    assert {"fc.weight", "fc.bias"} <= set(names)
    # ResNet convolutions have no bias; BatchNorm biases do and they train under bitfit
    assert any(n.endswith("bn1.bias") for n in names)
    assert not any(n.endswith("conv1.weight") for n in names)

"""Methods against their reference implementations: placement, defaults, initialisation, options."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from medpeft_ray.methods import get_method, merge_method, prepare_model
from medpeft_ray.models import build_backbone

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def vit(method: str, drop_path: float = 0.0, **options: object) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_backbone("vit_tiny_patch16_224", num_classes=3, image_size=32, drop_path=drop_path)
    return prepare_model(model, method, dict(options), "vit")


def test_ssf_scale_shifts_the_tokens_after_the_identity_final_norm() -> None:
    # dongzelian/SSF: x = ssf(self.norm(x)) before pooling, also when avg pooling makes norm the identity
    model = vit("ssf").eval()
    assert isinstance(model.norm, torch.nn.Identity) and model.norm.ssf.scale.shape == (192,)
    with torch.no_grad():
        before = model(X)
        model.norm.ssf.scale.mul_(torch.linspace(0.5, 2.0, 192))  # (a uniform change would vanish in fc_norm)
        assert not torch.allclose(model(X), before)
    with pytest.raises(ValueError, match="final: false"):
        merge_method(model, "ssf")
    assert not hasattr(vit("ssf", final=False).norm, "ssf")


def test_adaptformer_defaults_are_the_official_image_setup() -> None:
    options = get_method("adaptformer").options()
    assert (options.input, options.dropout, options.activation, options.scale, options.bottleneck) == ("raw", 0.1, "relu", 0.1, 6)


@pytest.mark.parametrize("source", ["raw", "normed"])
def test_adaptformer_reads_its_input_and_adds_outside_drop_path(source: str) -> None:
    # drop_path 1.0 on the last block drops both its branches in training: what is left is the adapter's
    model = vit("adaptformer", drop_path=1.0, dropout=0.0, input=source).train()
    block = model.blocks[-1]
    with torch.no_grad():
        block.mlp.adapter.up.weight.normal_()
    seen: dict[str, torch.Tensor] = {}
    block.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    block.register_forward_hook(lambda m, args, out: seen.update(y=out))
    with torch.no_grad():
        model(X)
        z = seen["x"] if source == "raw" else block.norm2(seen["x"])
        torch.testing.assert_close(seen["y"] - seen["x"], block.mlp.adapter.branch(z))


def test_fact_initialises_u_and_cores_like_nn_linear() -> None:
    model = vit("fact_tt", rank=8)
    core = model.blocks[0].mlp.fc2.fact.core.weight  # fan-in 4r
    for weight, fan_in in ((model.fact_shared.u.weight, 192), (core, 32)):
        bound = 1 / math.sqrt(fan_in)  # kaiming-uniform with a = sqrt(5)
        assert weight.abs().max() <= bound and weight.abs().max() > 0.9 * bound
    assert not model.fact_shared.v.weight.any()


def test_oft_uses_the_exact_cayley_transform_unless_told() -> None:
    rotation = vit("oft").blocks[0].attn.qkv.q.oft_R["default"]
    assert rotation.use_cayley_neumann is False
    assert vit("oft", cayley="neumann", neumann_terms=3).blocks[0].attn.qkv.q.oft_R["default"].num_cayley_neumann_terms == 3


def test_boft_keeps_its_butterfly_factors_without_peft_extension() -> None:
    model = vit("boft", block_size=4, butterfly_factor=3)
    assert model.blocks[0].attn.qkv.q.boft_R["default"].shape == (3, 48, 4, 4)
    with torch.no_grad():
        model.blocks[0].attn.qkv.q.boft_R["default"].normal_(std=0.1)
        expected = model.eval()(X)
        torch.testing.assert_close(merge_method(model, "boft")(X), expected, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="exactly one of block_size and block_num"):
        vit("boft", block_size=4, block_num=8)


def test_torch_block_diagonal_matches_torch_autograd() -> None:
    from medpeft_ray.methods.butterfly import TorchBlockDiagonal

    blocks = torch.randn(2, 3, 4, 4, requires_grad=True)
    reference = torch.stack([torch.block_diag(*b.unbind(0)) for b in blocks])
    torch.testing.assert_close(TorchBlockDiagonal.forward(blocks)[0], reference)
    grad = torch.randn_like(reference)
    (expected,) = torch.autograd.grad(reference, blocks, grad)
    torch.testing.assert_close(TorchBlockDiagonal.backward(grad, blocks)[0], expected)


def trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_selective_groups_compose_the_presets() -> None:
    combined = trainable(vit("selective", groups="bias,norm,attention"))
    assert combined == trainable(vit("bitfit")) | trainable(vit("layernorm")) | trainable(vit("attention")) - {"pos_embed"}
    assert trainable(vit("selective", groups=["attention", "pos_embed"])) == trainable(vit("attention"))
    assert trainable(vit("selective", groups="patch_embed,cls_token")) >= {"patch_embed.proj.weight", "cls_token"}
    with pytest.raises(ValueError, match="groups: unknown 'conv'"):
        vit("selective", groups="bias,conv")
    torch.manual_seed(0)
    resnet = build_backbone("resnet18", num_classes=3, image_size=32)
    assert "layer1.0.conv1.weight" in trainable(prepare_model(resnet, "selective", {"groups": "conv"}, "resnet"))
    with pytest.raises(ValueError, match="groups: unknown 'attention'; choose among bias, norm, conv"):
        prepare_model(resnet, "selective", {"groups": "attention"}, "resnet")


def test_default_lr_ranges_follow_the_optimizer(tmp_path: Path) -> None:
    from medpeft_ray.config import validate_search_dict

    def lr(method: str, optimizer: str) -> tuple[float, float]:
        raw = {"model": {"backbone": "vit_tiny_patch16_224"}, "method": {"name": method}, "train": {"optimizer": optimizer}}
        dist = validate_search_dict(raw, "x.yaml", tmp_path).distributions()["lr"]
        return dist.low, dist.high  # type: ignore[union-attr]

    sgd_low, sgd_high = lr("lora", "sgd")
    assert sgd_low <= 0.05 and sgd_high >= 0.2  # MED-PEFT's MRM recipe: SGD at 0.05-0.2
    assert sgd_low >= 10 * lr("lora", "adamw")[0]
    assert lr("attention", "adamw") == lr("full", "adamw")  # a third of ViT-B trains
    for method in ("vpt_deep", "prefix", "ia3", "vera"):
        assert lr(method, "adamw") == (1e-4, 3e-2), method


def test_sv_diff_weight_is_the_reference_reparameterisation() -> None:
    model = vit("sv_diff")
    layer = model.blocks[1].attn.qkv
    shift = layer.svdiff
    with torch.no_grad():
        shift.delta.normal_(std=0.5)
        u, s, vh = torch.linalg.svd(layer.weight, full_matrices=False)
        expected = u @ torch.diag(torch.relu(s + shift.delta)) @ vh  # mkshing/svdiff-pytorch's forward
        x = torch.randn(5, 192)
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, expected, layer.bias), atol=1e-4, rtol=1e-4)
    assert trainable(vit("sv_diff", targets="mlp", blocks="0")) >= {"blocks.0.mlp.fc1.svdiff.delta", "blocks.0.mlp.fc2.svdiff.delta"}


def test_difffit_gammas_start_at_one_beside_bias_and_norm() -> None:
    model = vit("difffit", blocks="last:1")
    assert torch.equal(model.blocks[11].attn.difffit.gamma, torch.ones(192))
    assert not hasattr(model.blocks[0].attn, "difffit")
    assert {"blocks.0.attn.qkv.bias", "blocks.0.norm1.weight"} <= trainable(model)

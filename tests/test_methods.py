"""Every registered method, table-driven over the registry, on a small ViT and a small ResNet.

A newly registered method must get a row in ``EXPECTED_TRAINABLE``; from then on it goes through
every check here: exactly the intended parameters train, forward/backward, unchanged output at
initialisation where declared, merge, save/load of the trainable state, and peft's format.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
import torch

from medpeft_ray.methods import count_parameters, get_method, list_methods, merge_method, prepare_model
from medpeft_ray.models import build_backbone
from medpeft_ray.train.checkpoint import PEFT_DIR, load_checkpoint_into, save_checkpoint

BACKBONES = {"vit": "vit_tiny_patch16_224", "resnet": "resnet18", "unet": "unet_tiny"}
_HEAD = {"vit": r"^(head|fc_norm)\.", "resnet": r"^fc\.", "unet": r"^$"}  # a U-Net has no head
_UNET_ATTN = r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\.transformer_blocks\.\d+\.attn[12]"
_QV = r"blocks\.\d+\.attn\.qkv\.[qv]"

#: (family, method) -> (regex every trainable name matches besides the head, regex some trainable name matches)
EXPECTED_TRAINABLE: dict[tuple[str, str], tuple[str, str]] = {
    ("vit", "full"): (r".*", r"^patch_embed\.proj\.weight$"),
    ("vit", "linear"): (r"^$", r"^head\.weight$"),
    ("vit", "bitfit"): (r"\.bias$", r"^blocks\.3\.mlp\.fc1\.bias$"),
    ("vit", "layernorm"): (r"norm\w*\.(weight|bias)$", r"^blocks\.0\.norm1\.weight$"),
    ("vit", "attention"): (r"^(pos_embed$|blocks\.\d+\.attn\.(qkv|proj)\.(weight|bias)$)", r"^pos_embed$"),
    ("vit", "lora"): (rf"^{_QV}\.lora_[AB]\.default\.weight$", r"^blocks\.11\.attn\.qkv\.v\.lora_A\.default\.weight$"),
    ("vit", "dora"): (rf"^{_QV}\.(lora_[AB]|lora_magnitude_vector)\.default(\.weight)?$", r"lora_magnitude_vector"),
    ("vit", "loha"): (rf"^{_QV}\.hada_w[12]_[ab]\.default$", r"^blocks\.0\.attn\.qkv\.q\.hada_w1_a\.default$"),
    ("vit", "lokr"): (rf"^{_QV}\.lokr_w[12](_[ab])?\.default$", r"lokr_w1"),
    ("vit", "ia3"): (r"^blocks\.\d+\.(attn\.qkv\.[kv]|mlp\.fc2)\.ia3_l\.default$", r"^blocks\.5\.mlp\.fc2\.ia3_l\.default$"),
    ("vit", "oft"): (rf"^{_QV}\.oft_R\.default\.weight$", r"oft_R"),
    ("vit", "boft"): (rf"^{_QV}\.boft_[Rs]\.default$", r"^blocks\.3\.attn\.qkv\.v\.boft_R\.default$"),
    ("vit", "selective"): (r"\.bias$|norm\w*\.weight$|^blocks\.\d+\.attn\.(qkv|proj)\.weight$", r"^blocks\.2\.attn\.qkv\.weight$"),
    ("vit", "difffit"): (r"\.bias$|norm\w*\.weight$|^blocks\.\d+\.(attn|mlp)\.difffit\.gamma$", r"^blocks\.3\.mlp\.difffit\.gamma$"),
    ("vit", "sv_diff"): (r"^blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])\.svdiff\.delta$", r"^blocks\.0\.attn\.qkv\.svdiff\.delta$"),
    ("vit", "vera"): (rf"^{_QV}\.vera_lambda_[bd]\.default$", r"vera_lambda_d"),
    ("vit", "ssf"): (r"^(patch_embed\.proj|norm|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2))\.ssf\.(scale|shift)$",
                     r"^blocks\.7\.mlp\.fc2\.ssf\.shift$"),
    ("vit", "adaptformer"): (r"^blocks\.\d+\.mlp\.adapter\.(down|up)\.(weight|bias)$", r"^blocks\.0\.mlp\.adapter\.up\.weight$"),
    ("vit", "adapter_houlsby"): (r"^blocks\.\d+\.(attn|mlp)\.adapter\.(down|up)\.(weight|bias)$", r"^blocks\.2\.attn\.adapter\.down\.weight$"),
    ("vit", "adapter_pfeiffer"): (r"^blocks\.\d+\.mlp\.adapter\.(down|up)\.(weight|bias)$", r"^blocks\.11\.mlp\.adapter\.up\.bias$"),
    ("vit", "vpt_shallow"): (r"^vpt\.prompts$", r"^vpt\.prompts$"),
    ("vit", "vpt_deep"): (r"^vpt\.prompts$", r"^vpt\.prompts$"),
    ("vit", "prefix"): (r"^blocks\.\d+\.attn\.prefix\.(key|value)$", r"^blocks\.4\.attn\.prefix\.value$"),
    ("vit", "fact_tt"): (r"^(fact_shared\.[uv]\.weight|blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.fact\.core\.weight)$",
                         r"^fact_shared\.v\.weight$"),
    ("resnet", "full"): (r".*", r"^conv1\.weight$"),
    ("resnet", "linear"): (r"^$", r"^fc\.weight$"),
    ("resnet", "bitfit"): (r"\.bias$", r"^layer1\.0\.bn1\.bias$"),
    ("resnet", "selective"): (r"\.bias$|(bn\d|downsample\.1)\.weight$", r"^layer3\.0\.downsample\.1\.weight$"),
    ("resnet", "batchnorm"): (r"bn\d\.(weight|bias)$|downsample\.1\.(weight|bias)$", r"^layer2\.0\.downsample\.1\.weight$"),
    ("resnet", "ssf"): (r"(bn\d|downsample\.1)\.ssf\.(scale|shift)$", r"^layer4\.1\.bn2\.ssf\.scale$"),
    ("resnet", "tsa"): (r"^layer\d\.\d\.conv[12]\.tsa\.conv\.weight$", r"^layer3\.1\.conv2\.tsa\.conv\.weight$"),
    ("resnet", "lora"): (r"^layer\d\.\d\.conv[123]\.lora_[AB]\.default\.weight$", r"^layer1\.0\.conv1\.lora_B\.default\.weight$"),
    ("unet", "full"): (r".*", r"^conv_in\.weight$"),
    ("unet", "bitfit"): (r"\.bias$", r"^down_blocks\.0\.resnets\.0\.conv1\.bias$"),
    ("unet", "norm"): (r"norm\w*\.(weight|bias)$", r"^up_blocks\.1\.resnets\.0\.norm1\.weight$"),
    ("unet", "attention"): (rf"^{_UNET_ATTN}\.", r"^up_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k\.weight$"),
    ("unet", "selective"): (rf"\.bias$|norm\w*\.weight$|^{_UNET_ATTN}\.", r"attn1\.to_q\.weight$"),
    ("unet", "lora"): (rf"^{_UNET_ATTN}\.(to_[qkv]|to_out\.0)\.lora_[AB]\.default\.weight$", r"attn2\.to_v\.lora_B"),
    ("unet", "difffit"): (r"\.bias$|norm\w*\.weight$|\.(attn[12]|ff)\.difffit\.gamma$", r"\.attn2\.difffit\.gamma$"),
    ("unet", "sv_diff"): (r"\.(attn[12]\.(to_[qkv]|to_out\.0)|ff\.net\.(0\.proj|2))\.svdiff\.delta$", r"attn2\.to_k\.svdiff"),
}
CASES = sorted(EXPECTED_TRAINABLE)
#: options the merge test uses instead of the defaults: SSF's default final scale-shift on a
#: ViT follows the identity norm of average pooling, which no timm weight can hold
MERGE_OPTIONS: dict[tuple[str, str], dict[str, object]] = {("vit", "ssf"): {"final": False}}


def backbone(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone(BACKBONES[family], num_classes=3, image_size=32)


def adapted(family: str, method: str, **options: object) -> torch.nn.Module:
    return prepare_model(backbone(family), method, dict(options), family)


def run(family: str, model: torch.nn.Module) -> torch.Tensor:
    """The model's output on fixed inputs: images, or a U-Net's noisy latents, timesteps and text states."""
    if family == "unet":
        gen = torch.Generator().manual_seed(1)
        latents, text = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 7, 32, generator=gen)
        return model(latents, torch.tensor([10, 700]), encoder_hidden_states=text, return_dict=False)[0]
    return model(inputs())


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def inputs() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def perturb_trainable(model: torch.nn.Module) -> None:
    """Moves every trainable parameter off its initial value, as training would."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


def test_every_registered_method_has_expectations() -> None:
    # a newly registered method must be added to the table above, so it is tested
    for family in BACKBONES:
        assert set(list_methods(family)) == {m for f, m in EXPECTED_TRAINABLE if f == family}, family


@pytest.mark.parametrize("family,method", CASES)
def test_exactly_intended_parameters_train(family: str, method: str) -> None:
    model = adapted(family, method)
    names = trainable_names(model)
    every, some = EXPECTED_TRAINABLE[(family, method)]
    outside = [n for n in names if not re.search(_HEAD[family], n) and not re.search(every, n)]
    assert not outside, outside[:5]
    assert any(re.search(some, n) for n in names), names[:10]
    # the head always trains (a U-Net has none)
    head = {"vit": {"head.weight", "head.bias"}, "resnet": {"fc.weight", "fc.bias"}, "unet": set()}[family]
    assert head <= set(names)
    trainable, total = count_parameters(model)
    assert 0 < trainable <= total
    if method not in ("full", "attention", "selective"):
        assert trainable < total / 5


@pytest.mark.parametrize("family,method", CASES)
def test_forward_backward_reaches_only_trainable(family: str, method: str) -> None:
    model = adapted(family, method).train()
    loss = run(family, model).sum()
    loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
        else:
            assert param.grad is None, name


@pytest.mark.parametrize("family,method", CASES)
def test_output_at_initialisation(family: str, method: str) -> None:
    base = backbone(family).eval()
    with torch.no_grad():
        before = run(family, base)
        after = run(family, prepare_model(base, method, {}, family).eval())
    if get_method(method).identity_at_init:
        torch.testing.assert_close(after, before)
    else:  # a method that does not promise it really changes the output (prompts, SSF's random init)
        assert not torch.allclose(after, before)


@pytest.mark.parametrize("family,method", [c for c in CASES if get_method(c[1]).merge is not None])
def test_merge_gives_same_outputs_as_plain_timm_model(family: str, method: str) -> None:
    model = adapted(family, method, **MERGE_OPTIONS.get((family, method), {}))
    perturb_trainable(model)
    model.eval()
    with torch.no_grad():
        expected = run(family, model)
        merged = merge_method(model, method).eval()
        torch.testing.assert_close(run(family, merged), expected, atol=2e-5, rtol=1e-4)
    # the merged weights are a plain timm checkpoint: strict load into a fresh backbone
    fresh = build_backbone(BACKBONES[family], num_classes=3, image_size=32)
    fresh.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(run(family, fresh.eval()), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["adaptformer", "adapter_houlsby", "vpt_deep", "prefix"])
def test_unmergeable_method_says_so(method: str) -> None:
    with pytest.raises(ValueError, match=f"method '{method}' cannot be merged.*mergeable: .*lora"):
        merge_method(adapted("vit", method), method)


@pytest.mark.parametrize("family,method", CASES)
def test_trainable_state_round_trips(family: str, method: str, tmp_path: Path) -> None:
    model = adapted(family, method)
    perturb_trainable(model)
    model.eval()
    with torch.no_grad():
        expected = run(family, model)
    save_checkpoint(tmp_path, model, {"epoch": 1})
    restored = adapted(family, method).eval()
    assert load_checkpoint_into(tmp_path, restored)["epoch"] == 1
    with torch.no_grad():
        torch.testing.assert_close(run(family, restored), expected)
    assert (tmp_path / PEFT_DIR).is_dir() == get_method(method).peft_native


@pytest.mark.parametrize("family,method", [c for c in CASES if get_method(c[1]).peft_native])
def test_peft_native_adapter_loads_with_peft(family: str, method: str, tmp_path: Path) -> None:
    from peft import PeftModel

    from medpeft_ray.methods.peft_family import split_qkv

    model = adapted(family, method)
    perturb_trainable(model)
    model.eval()
    with torch.no_grad():
        expected = run(family, model)
    save_checkpoint(tmp_path, model, {"epoch": 1})
    base = backbone(family)  # the same backbone: same name, classes, size and (here: seeded) weights
    loaded = PeftModel.from_pretrained(split_qkv(base) if family == "vit" else base, str(tmp_path / PEFT_DIR)).eval()
    with torch.no_grad():
        torch.testing.assert_close(run(family, loaded), expected)


def test_lora_defaults_follow_med_peft_q_and_v_only() -> None:
    model = adapted("vit", "lora", rank=4)
    adapted_layers = {n.split(".lora_")[0] for n in trainable_names(model) if ".lora_" in n}
    assert adapted_layers == {f"blocks.{i}.attn.qkv.{p}" for i in range(12) for p in "qv"}
    qkv = model.blocks[0].attn.qkv
    assert qkv.q.lora_A["default"].weight.shape == (4, 192)  # Q and V each get their own rank-r update
    assert qkv.k.weight.requires_grad is False and not hasattr(qkv.k, "lora_A")
    assert qkv.q.scaling["default"] == pytest.approx(32 / 4)  # alpha 32


def test_lora_block_and_target_selection() -> None:
    model = adapted("vit", "lora", rank=2, blocks="0,5", targets="q,k,v,fc2")
    layers = {n.split(".lora_")[0] for n in trainable_names(model) if ".lora_" in n}
    assert layers == {f"blocks.{b}.{p}" for b in (0, 5) for p in ("attn.qkv.q", "attn.qkv.k", "attn.qkv.v", "mlp.fc2")}
    last = adapted("vit", "adapter_pfeiffer", blocks="last:2")
    assert {n.split(".")[1] for n in trainable_names(last) if ".adapter." in n} == {"10", "11"}
    every = adapted("vit", "ssf", blocks="every:4")
    assert {n.split(".")[1] for n in trainable_names(every) if n.startswith("blocks.")} == {"0", "4", "8"}


@pytest.mark.parametrize("method,options,message", [
    ("lora", {"blocks": [12]}, r"blocks: \[12\] out of range for a 12-block backbone"),
    ("prefix", {"blocks": "last:13"}, "only 12 blocks"),
    ("lora", {"targets": ["qkv"]}, "targets: unknown 'qkv'; choose among q, k, v, proj, fc1, fc2"),
])
def test_bad_layer_choice_is_an_error(method: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        adapted("vit", method, **options)


def test_method_on_wrong_family_is_an_error() -> None:
    with pytest.raises(ValueError, match="does not apply to resnet"):
        prepare_model(backbone("resnet"), "vpt_deep", {}, "resnet")
    with pytest.raises(ValueError, match="targets: unknown 'q', 'v'; choose among conv1, conv2, conv3, downsample"):
        prepare_model(backbone("resnet"), "lora", {"targets": "q,v"}, "resnet")


def test_unknown_method_and_option_are_errors() -> None:
    with pytest.raises(KeyError, match="known: .*adaptformer.*lora.*vpt_deep"):
        get_method("lorra")
    with pytest.raises(ValueError, match="rnak"):
        adapted("vit", "lora", rnak=4)


def test_vpt_prompts_stay_out_of_pooling() -> None:
    seen: list[int] = []
    model = adapted("vit", "vpt_deep", tokens=7)
    model.blocks[3].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    model.eval()(inputs())
    assert seen == [1 + 7 + 4]  # class token, 7 prompts, a 2x2 patch grid at 32 px
    assert model.num_prefix_tokens == 8
    # deep prompts: changing block 3's prompts changes the output; shallow has a single set
    with torch.no_grad():
        before = model(inputs())
        model.vpt.prompts[3].mul_(-2.0)  # (a constant shift would vanish in LayerNorm)
        assert not torch.allclose(model(inputs()), before)
    assert adapted("vit", "vpt_shallow", tokens=7).vpt.prompts.shape == (1, 7, 192)


def test_frozen_batchnorm_keeps_its_statistics() -> None:
    frozen, tuned = adapted("resnet", "linear").train(), adapted("resnet", "batchnorm").train()
    stats = frozen.bn1.running_mean.clone()
    frozen(inputs()), tuned(inputs())
    assert torch.equal(frozen.bn1.running_mean, stats)  # frozen: pre-trained statistics, never updated
    assert not torch.equal(tuned.bn1.running_mean, stats)  # tuned BatchNorm normalises with batch statistics


@pytest.mark.slow
def test_counts_on_meta_device_match_real_model() -> None:
    from medpeft_ray.methods import method_summaries

    rows = {r["method"]: r for r in method_summaries(BACKBONES["vit"], num_classes=3, image_size=32)}
    assert set(rows) == set(list_methods("vit"))
    for method in ("lora", "vpt_deep", "fact_tt", "vera"):
        assert rows[method]["trainable_params"] == count_parameters(adapted("vit", method))[0], method
    assert rows["full"]["trainable_percent"] == 100.0
    assert rows["lora"]["trainable_percent"] < 2 and rows["lora"]["peft_native"] and rows["lora"]["mergeable"]


def test_every_method_has_a_valid_default_space() -> None:
    from medpeft_ray.config import validate_search_dict

    with tempfile.TemporaryDirectory() as tmp:
        for family, method in CASES:
            generation = {"task": "generation", "train": {"augment": "none"}} if family == "unet" else {}
            config = validate_search_dict(
                {"model": {"backbone": BACKBONES[family]}, "method": {"name": method}, **generation},
                f"{method}.yaml", Path(tmp),
            )
            assert "lr" in config.distributions(), method


def test_sv_diff_factorises_each_frozen_weight_once_and_identically() -> None:
    from medpeft_ray.methods import modules

    modules._SVD_CACHE.clear()
    first = adapted("vit", "sv_diff")
    cached = len(modules._SVD_CACHE)
    second = adapted("vit", "sv_diff")  # the next trial: the same pristine weights
    assert cached > 0 and len(modules._SVD_CACHE) == cached
    a = dict(first.named_buffers())
    b = dict(second.named_buffers())
    name = next(n for n in a if n.endswith("svdiff.s"))
    assert torch.equal(a[name], b[name]) and a[name].data_ptr() != b[name].data_ptr()  # equal, not shared
    # a weight that differs (another checkpoint) gets its own factorisation
    other = backbone("vit")
    with torch.no_grad():
        other.blocks[0].attn.qkv.weight.add_(1.0)
    prepare_model(other, "sv_diff", {}, "vit")
    assert len(modules._SVD_CACHE) == cached + 1

"""diffusers' LoRA, the way its DreamBooth / text-to-image LoRA scripts add it: a tiny
``UNet2DConditionModel`` from its config, ``unet.add_adapter(LoraConfig(...))`` (PEFT's layers
injected into the UNet itself, no PeftModel around it), then ``fuse(unet)``. One training step
(the scripts' noise-prediction MSE): outputs and grads equal PEFT's; the conv LoRA layers stay
PEFT's, with the warning; and the LoRA state dict the scripts save does not change by fusing."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("diffusers")

from diffusers import UNet2DConditionModel  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

from lorakern.integrations.peft import fuse, is_fused  # noqa: E402

ATTENTION = ["to_k", "to_q", "to_v", "to_out.0"]  # the scripts' target_modules


def lora_unet(targets=None) -> UNet2DConditionModel:
    """The tiny UNet, frozen, with a LoRA adapter on ``targets`` (None: no adapter)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, norm_num_groups=8, attention_head_dim=4)
    unet.requires_grad_(False)
    if targets is None:
        return unet
    torch.manual_seed(1)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets))
    with torch.no_grad():  # "gaussian" init keeps B = 0: make the adapters act from the first step
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return unet


def step(unet):
    """One step of the scripts' loss: MSE between the predicted and the true noise."""
    g = torch.Generator().manual_seed(2)
    latents, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 5, 24, generator=g)
    pred = unet(latents + noise, torch.tensor([10, 500]), encoder_hidden_states=text).sample
    loss = torch.nn.functional.mse_loss(pred, noise)
    loss.backward()
    return pred.detach(), {n: p.grad for n, p in unet.named_parameters() if p.requires_grad}


def lora_layers(unet):
    from peft.tuners.lora.layer import LoraLayer

    return {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("with_conv", [False, True], ids=["attention", "attention+conv"])
def test_unet_lora_step_equals_peft(with_conv):
    targets = ATTENTION + (["conv1", "conv2"] if with_conv else [])
    ref, got = lora_unet(targets), lora_unet(targets)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = fuse(got)
    layers = lora_layers(got)
    convs = [n for n, m in layers.items() if type(m).__name__ == "Conv2d"]
    assert fused == len(layers) - len(convs) > 0
    assert all(not is_fused(layers[n]) for n in convs)
    left = [str(w.message) for w in caught if "left to PEFT" in str(w.message)]
    if with_conv:
        assert len(convs) > 0 and len(left) == 1 and f"{len(convs)} LoRA layer(s)" in left[0] and "Conv2d" in left[0]
    else:
        assert not left

    y_ref, g_ref = step(ref)
    y_got, g_got = step(got)
    torch.testing.assert_close(y_got, y_ref, rtol=1e-5, atol=1e-5)
    assert g_ref.keys() == g_got.keys() and len(g_ref) == 2 * len(layers)
    for name in g_ref:
        scale = g_ref[name].abs().max()
        assert (g_got[name] - g_ref[name]).abs().max() <= 1e-5 * scale, name


def test_saved_lora_state_dict_is_unchanged_by_fusing(tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import load_file

    unet = lora_unet(ATTENTION)
    before = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    fuse(unet)
    after = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    assert before.keys() == after.keys() and len(before) > 0
    assert all(torch.equal(before[k], after[k]) for k in before)
    # What the scripts write at the end of training, read back as plain diffusers LoRA.
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=after)
    saved = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert saved.keys() == {f"unet.{k}" for k in after}
    # Plain diffusers loads the file into a UNet without lorakern and computes the fused one's output.
    fresh = lora_unet()
    fresh.load_lora_adapter(saved, prefix="unet", adapter_name="default")
    fresh_sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(fresh))
    assert fresh_sd.keys() == after.keys() and all(torch.equal(fresh_sd[k], after[k]) for k in after)
    torch.testing.assert_close(step(fresh)[0], step(unet)[0], rtol=1e-5, atol=1e-5)

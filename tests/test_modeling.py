"""The model against independent references: timm's RegStage, a per-mask loop for the object encoder, per-sample runs."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import box_mask, chat_prompt, make_frames
from transformers_videorefer import VideoReferForCausalLM
from transformers_videorefer.modeling_videorefer import VideoReferRegNetStage, VideoReferSTCConnector


timm_regnet = pytest.importorskip("timm.models.regnet")


def timm_stage(depth, in_channels, out_channels):
    from timm.layers import LayerNorm2d

    return timm_regnet.RegStage(
        depth=depth, in_chs=in_channels, out_chs=out_channels, stride=1, dilation=1, act_layer=nn.SiLU,
        norm_layer=LayerNorm2d,
    )


@pytest.mark.parametrize("depth,in_channels,out_channels", [(1, 8, 8), (2, 12, 20), (4, 16, 24)])
def test_regnet_stage_matches_timm(depth, in_channels, out_channels):
    reference = timm_stage(depth, in_channels, out_channels).eval()
    for parameter in reference.parameters():  # non-trivial norms and biases
        nn.init.normal_(parameter, std=0.3)
    ours = VideoReferRegNetStage(depth, in_channels, out_channels).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    inputs = torch.randn(3, in_channels, 7, 7)
    torch.testing.assert_close(ours(inputs), reference(inputs), rtol=1e-5, atol=1e-5)


def test_stc_connector_matches_timm_composition(tiny_model):
    config = tiny_model.config
    connector = VideoReferSTCConnector(config).eval()
    for parameter in connector.parameters():
        nn.init.normal_(parameter, std=0.2)
    vision, text = config.vision_config.hidden_size, config.text_config.hidden_size
    s1, s2 = timm_stage(config.connector_depth, vision, text), timm_stage(config.connector_depth, text, text)
    s1.load_state_dict(connector.s1.state_dict())
    s2.load_state_dict(connector.s2.state_dict())
    batch, frames, side = 2, 4, config.patches_per_side
    features = torch.randn(batch, frames, side * side, vision)

    # [b, t, (h w), d] -> per-frame stage 1 -> 3D conv over (t, h, w) -> per-frame stage 2 -> [b, (t h w), d] -> MLP
    x = features.reshape(batch * frames, side, side, vision).permute(0, 3, 1, 2)
    x = s1(x).reshape(batch, frames, text, side, side).permute(0, 2, 1, 3, 4)
    x = connector.sampler(x)
    new_t, new_side = x.shape[2], x.shape[3]
    x = s2(x.permute(0, 2, 1, 3, 4).reshape(batch * new_t, text, new_side, new_side))
    x = x.reshape(batch, new_t, text, new_side * new_side).permute(0, 1, 3, 2).reshape(batch, -1, text)
    expected = connector.readout(x)
    actual = connector(features)
    assert actual.shape == (batch, config.num_visual_tokens, text)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def release_token_merge(tokens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The release's merge for one object, written out with Python loops: [k, C] -> [<= num_tokens, C]."""
    k = tokens.shape[0]
    if k <= num_tokens:
        return tokens
    similarity = (F.normalize(tokens[:-1], dim=-1) * F.normalize(tokens[1:], dim=-1)).sum(-1)
    threshold = torch.topk(similarity, k - num_tokens).values[-1]
    groups, current = [], [tokens[0]]
    for i in range(1, k):
        if similarity[i - 1] < threshold:
            groups.append(torch.stack(current).mean(0))
            current = []
        current.append(tokens[i])
    groups.append(torch.stack(current).mean(0))
    return torch.stack(groups)


def reference_region_tokens(model, frames_pixels, regions):
    """Per-object loop: vision features of each mask's frame, per-mask bilinear resize, mean, merge, MLP."""
    inner = model.model
    side = model.config.patches_per_side
    outputs = []
    for frame_slots, masks in regions:
        pooled = []
        for slot, mask in zip(frame_slots, masks):
            features = inner.get_frame_features(frames_pixels[slot : slot + 1])[0].float()
            resized = F.interpolate(mask[None, None].float(), size=(side, side), mode="bilinear", align_corners=False)
            weights = (resized.flatten() > 0).float()
            pooled.append((features * weights[:, None]).sum(0) / (weights.sum() + 1e-8))
        merged = release_token_merge(torch.stack(pooled), model.config.num_region_tokens)
        outputs.append(inner.object_encoder.mlp(merged))
    return torch.cat(outputs)


def test_region_tokens_match_per_mask_reference(tiny_model, tiny_processor):
    frames = make_frames(12, 40, 60)
    first = box_mask(40, 60, 5, 10, 20, 30)
    second = box_mask(40, 60, 18, 25, 39, 59)
    regions = [{7: first}, {0: second, 2: second, 3: first, 5: second, 8: first, 11: second}]
    prompt = chat_prompt(tiny_processor, "What do <region> and <region> do?")
    inputs = tiny_processor(videos=frames, masks=regions, text=prompt, return_tensors="pt")
    with torch.no_grad():
        actual = tiny_model.model.get_region_features(
            inputs["region_pixel_values"][0:1], inputs["region_masks"][0:1], inputs["region_mask_sizes"][0:1],
            inputs["region_frame_ids"][0:1], inputs["region_object_ids"][0:1],
        )
        frame_order = [0, 2, 3, 5, 7, 8, 11]
        pixels = inputs["region_pixel_values"][0]
        as_tensor = lambda mask: torch.from_numpy(mask)  # noqa: E731
        expected = reference_region_tokens(
            tiny_model,
            pixels,
            [
                ([frame_order.index(7)], [as_tensor(first)]),
                ([frame_order.index(f) for f in (0, 2, 3, 5, 8, 11)], [as_tensor(m) for m in (second, second, first, second, first, second)]),
            ],
        )
    assert actual.shape == (1 + 4, tiny_model.config.text_config.hidden_size)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_image_is_a_still_video(tiny_model, tiny_processor):
    image = make_frames(1, 36, 36)[0]
    mask = box_mask(36, 36, 4, 4, 20, 30)
    image_inputs = tiny_processor(
        images=image, masks=[{0: mask}], text=chat_prompt(tiny_processor, "What is <region>?", "<image>"),
        return_tensors="pt",
    )
    still = image[None].repeat(tiny_model.config.num_frames, axis=0)
    video_inputs = tiny_processor(
        videos=still, masks=[{0: mask}], text=chat_prompt(tiny_processor, "What is <region>?"), return_tensors="pt"
    )
    # Placeholder embeddings are replaced, so the language model sees the same sequence either way.
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(**image_inputs).logits, tiny_model(**video_inputs).logits)


def test_batch_with_different_objects_and_frames_matches_each_sample(tiny_model, tiny_processor):
    videos = [make_frames(12, 40, 60, seed=1), make_frames(7, 30, 30, seed=2), make_frames(20, 24, 32, seed=3)]
    masks = [
        [{3: box_mask(40, 60, 0, 0, 20, 20)}, {1: box_mask(40, 60, 10, 10, 40, 60), 5: box_mask(40, 60, 0, 30, 30, 60)}],
        [],
        [{k: box_mask(24, 32, k % 10, 2, 14 + k % 10, 20) for k in (0, 3, 6, 9, 12, 15, 18)}],
    ]
    questions = ["Compare <region> with <region>.", "Describe the video.", "Where does <region> go?"]
    texts = [chat_prompt(tiny_processor, q) for q in questions]
    batch = tiny_processor(videos=videos, masks=masks, text=texts, return_tensors="pt")
    with torch.no_grad():
        position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        batch_logits = tiny_model(**batch, position_ids=position_ids).logits
        for index in range(3):
            single = tiny_processor(videos=videos[index], masks=masks[index], text=texts[index], return_tensors="pt")
            logits = tiny_model(**single).logits[0]
            length = logits.shape[0]
            torch.testing.assert_close(batch_logits[index, -length:], logits, rtol=1e-4, atol=1e-4)


def test_training_forward_returns_loss_and_gradients(tiny_model, tiny_processor):
    model = copy.deepcopy(tiny_model).train()
    frames = make_frames(10, 32, 32)
    prompt = chat_prompt(tiny_processor, "What colour is <region>?") + "red<|im_end|>"
    inputs = tiny_processor(videos=frames, masks=[{2: box_mask(32, 32, 4, 4, 20, 20)}], text=prompt, return_tensors="pt")
    labels = inputs["input_ids"].clone()
    labels[:, :-3] = -100
    output = model(**inputs, labels=labels)
    assert output.loss.ndim == 0 and torch.isfinite(output.loss)
    output.loss.backward()
    for name in ("model.object_encoder.mlp.0.weight", "model.connector.readout.0.weight", "lm_head.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name

    model.zero_grad()
    model.gradient_checkpointing_enable()
    checkpointed = model(**inputs, labels=labels)
    torch.testing.assert_close(checkpointed.loss, output.loss)
    checkpointed.loss.backward()
    assert model.model.object_encoder.mlp[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attention_implementations_agree(tiny_model, tiny_processor, implementation, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    model = VideoReferForCausalLM.from_pretrained(tmp_path, attn_implementation=implementation).eval()
    assert model.config.text_config._attn_implementation == implementation
    inputs = tiny_processor(
        videos=make_frames(8, 32, 32), masks=[{1: box_mask(32, 32, 0, 0, 16, 16)}],
        text=chat_prompt(tiny_processor, "Describe <region>."), return_tensors="pt",
    )
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, tiny_model(**inputs).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash_attention_2 needs a CUDA GPU")
def test_flash_attention_2_agrees_with_sdpa(tiny_model, tiny_processor, tmp_path):
    pytest.importorskip("flash_attn")
    tiny_model.save_pretrained(tmp_path)
    inputs = tiny_processor(
        videos=make_frames(8, 32, 32), masks=[{1: box_mask(32, 32, 0, 0, 16, 16)}],
        text=chat_prompt(tiny_processor, "Describe <region>."), return_tensors="pt",
    ).to("cuda")
    logits = {}
    for implementation in ("sdpa", "flash_attention_2"):
        model = VideoReferForCausalLM.from_pretrained(
            tmp_path, attn_implementation=implementation, dtype=torch.bfloat16
        ).to("cuda").eval()
        with torch.no_grad():
            logits[implementation] = model(**inputs).logits.float()
    torch.testing.assert_close(logits["flash_attention_2"], logits["sdpa"], rtol=2e-2, atol=2e-2)


def test_placeholder_count_mismatch_is_an_error(tiny_model, tiny_processor):
    inputs = tiny_processor(
        videos=make_frames(8, 32, 32), masks=[{1: box_mask(32, 32, 0, 0, 16, 16)}],
        text=chat_prompt(tiny_processor, "Describe <region>."), return_tensors="pt",
    )
    region_id = tiny_model.config.region_token_id
    inputs["input_ids"][inputs["input_ids"] == tiny_model.config.video_token_id] = region_id
    with pytest.raises(ValueError, match="<video> placeholder"):
        tiny_model(**inputs)
    no_masks = tiny_processor(
        videos=make_frames(8, 32, 32), text=chat_prompt(tiny_processor, "Describe it."), return_tensors="pt"
    )
    no_masks["input_ids"][0, -2] = region_id
    with pytest.raises(ValueError, match="<region> placeholder"):
        tiny_model(**no_masks)

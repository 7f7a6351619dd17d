"""Generation: cache == no cache, batch == each sample alone, beams, and no re-encoding after the first step."""

import pytest
import torch

from conftest import box_mask, chat_prompt, make_frames


def sample_inputs(processor, index: int):
    videos = [make_frames(14, 40, 60, seed=11), make_frames(6, 28, 28, seed=12), make_frames(9, 32, 24, seed=13)]
    masks = [
        [{2: box_mask(40, 60, 0, 0, 20, 30)}, {k: box_mask(40, 60, 10, 20, 35, 55) for k in (0, 3, 5, 8, 11, 13)}],
        [{1: box_mask(28, 28, 4, 4, 20, 20), 4: box_mask(28, 28, 8, 8, 26, 26)}],
        [],
    ]
    questions = ["How does <region> move around <region>?", "What is <region>?", "Summarise the clip."]
    return videos[index], masks[index], chat_prompt(processor, questions[index])


def generate(model, inputs, **kwargs):
    with torch.no_grad():
        output = model.generate(**inputs, **{"max_new_tokens": 8, "do_sample": False, **kwargs})
    return output[:, inputs["input_ids"].shape[1] :]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_greedy_with_and_without_cache(tiny_model, tiny_processor, index):
    video, masks, text = sample_inputs(tiny_processor, index)
    inputs = tiny_processor(videos=video, masks=masks, text=text, return_tensors="pt")
    assert torch.equal(generate(tiny_model, inputs), generate(tiny_model, inputs, use_cache=False))


def test_left_padded_batch_matches_each_sample(tiny_model, tiny_processor):
    samples = [sample_inputs(tiny_processor, index) for index in range(3)]
    batch = tiny_processor(
        videos=[s[0] for s in samples], masks=[s[1] for s in samples], text=[s[2] for s in samples], return_tensors="pt"
    )
    batched = generate(tiny_model, batch)
    for index, (video, masks, text) in enumerate(samples):
        alone = generate(tiny_model, tiny_processor(videos=video, masks=masks, text=text, return_tensors="pt"))
        assert batched[index].tolist() == alone[0].tolist()


def test_beams_and_several_return_sequences(tiny_model, tiny_processor):
    samples = [sample_inputs(tiny_processor, index) for index in range(2)]
    batch = tiny_processor(
        videos=[s[0] for s in samples], masks=[s[1] for s in samples], text=[s[2] for s in samples], return_tensors="pt"
    )
    beams = generate(tiny_model, batch, num_beams=3, num_return_sequences=2)
    assert beams.shape[0] == 4
    # The best beam of a batched run equals the best beam of each sample alone.
    for index, (video, masks, text) in enumerate(samples):
        alone = generate(tiny_model, tiny_processor(videos=video, masks=masks, text=text, return_tensors="pt"), num_beams=3)
        assert beams[2 * index].tolist() == alone[0].tolist()
    sampled = generate(tiny_model, batch, do_sample=True, num_return_sequences=3)
    assert sampled.shape[0] == 6


def test_pixels_and_regions_are_encoded_once(tiny_model, tiny_processor):
    video, masks, text = sample_inputs(tiny_processor, 0)
    inputs = tiny_processor(videos=video, masks=masks, text=text, return_tensors="pt")
    calls = {"vision": 0, "object_encoder": 0}
    hooks = [
        tiny_model.model.vision_tower.register_forward_hook(lambda *_: calls.__setitem__("vision", calls["vision"] + 1)),
        tiny_model.model.object_encoder.register_forward_hook(
            lambda *_: calls.__setitem__("object_encoder", calls["object_encoder"] + 1)
        ),
    ]
    try:
        new_tokens = generate(tiny_model, inputs, min_new_tokens=8)
    finally:
        for hook in hooks:
            hook.remove()
    assert new_tokens.shape[1] == 8
    # One call for the video frames and one for the mask frames, both in the first step only.
    assert calls == {"vision": 2, "object_encoder": 1}


def test_placeholder_ids_outside_the_vocabulary(tiny_processor):
    """The released models have no embedding rows for <image>/<video>: their ids lie past the vocabulary."""
    from transformers_videorefer.tiny import build_tiny_model_and_processor

    tokenizer = tiny_processor.tokenizer
    vocab_size = min(tokenizer.convert_tokens_to_ids(["<image>", "<video>"]))
    text_config = {**build_tiny_model_and_processor()[0].config.text_config.to_dict(), "vocab_size": vocab_size}
    model, processor = build_tiny_model_and_processor(text_config=text_config)
    assert model.config.video_token_id >= vocab_size > model.config.region_token_id
    video, masks, text = sample_inputs(processor, 0)
    inputs = processor(videos=video, masks=masks, text=text, return_tensors="pt")
    assert model(**inputs).logits.shape[-1] == vocab_size
    assert torch.equal(generate(model, inputs), generate(model, inputs, use_cache=False))

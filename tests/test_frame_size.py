"""One frame size: a converted LLaVA-OneVision sees a video file as its source did. The tower's `image_size` is not a
whole number of patches here (30 px in 4-px patches, as 384 px in 14-px patches), so that a second "whole patches"
size (28 px, as 378 px) anywhere in the processor or the model would show."""

import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
)

from crosslmm.convert.cli import convert, parse_args
from crosslmm.samples import build_tokenizer
from tiny import tiny_video
from tiny_sources import llava_onevision_model
from video_processing_crosslmm import read_video


SIZE = 30  # 7 whole patches of 4 px and 2 px the patch embedding ignores
SIGLIP = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "size": {"height": SIZE, "width": SIZE}}


def llava_onevision_source(folder):
    """A tiny LLaVA-OneVision with its transformers processor, as the llava-hf checkpoints ship them."""
    model = llava_onevision_model(vision={"image_size": SIZE})
    model.save_pretrained(folder)
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(**SIGLIP),
        video_processor=LlavaOnevisionVideoProcessor(**SIGLIP),
        tokenizer=build_tokenizer(),
    )
    processor.save_pretrained(folder)
    return folder


@torch.no_grad()
def test_converted_processor_and_tower_give_the_sources_original_visual_tokens(tmp_path):
    source = llava_onevision_source(tmp_path / "llava-onevision")
    output = convert(parse_args(["--source", str(source), "--output", str(tmp_path / "crosslmm"), "--no-verify"]))
    model = AutoModelForImageTextToText.from_pretrained(output, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(output, trust_remote_code=True)
    assert model.config.image_size == SIZE and processor.video_processor.size.height == SIZE

    video = str(tiny_video(tmp_path / "clip.mp4"))
    ours = processor.video_processor(videos=[video], num_frames=4, return_metadata=True, return_tensors="pt")
    pixels = ours["pixel_values_videos"]
    assert pixels.shape == (1, 4, 3, SIZE, SIZE)

    # The same frames of the file through transformers' own LLaVA-OneVision processor and tower.
    reference = LlavaOnevisionForConditionalGeneration.from_pretrained(source).eval()
    source_processor = LlavaOnevisionProcessor.from_pretrained(source)
    frames, _ = read_video(video)
    indices = ours["video_metadata"][0].frames_indices
    theirs = source_processor.video_processor(videos=[frames[indices]], do_sample_frames=False, return_tensors="pt")
    torch.testing.assert_close(pixels, theirs["pixel_values_videos"], rtol=0, atol=1e-5)

    expected = reference.model.vision_tower(pixels[0], output_hidden_states=True).hidden_states[-1]
    original = model.get_video_features(pixels).last_hidden_state
    torch.testing.assert_close(original, expected, rtol=1e-5, atol=1e-5)

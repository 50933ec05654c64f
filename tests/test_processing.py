"""CrossLMM processors on videos the tests encode with PyAV: sampling, real-world files, bad inputs, placeholder
expansion and layouts, chat template into a tiny model, and the saved folder through the Auto classes."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from chats import video_question
from crosslmm.samples import build_tokenizer, processor_for_config
from isolated import load_as_users_do
from processing_crosslmm import CHAT_TEMPLATE, CrossLMMImageProcessor, CrossLMMProcessor
from tiny import IMAGE_SIZE, tiny_config, tiny_model
from video_processing_crosslmm import (
    CrossLMMVideoProcessor,
    FrameSelection,
    VideoLoadError,
    read_video,
    sample_frame_indices,
)
from videos import (
    corrupt,
    encode_audio_only,
    encode_empty_video,
    encode_video,
    has_encoder,
    read_index,
    truncate,
)


# A Python whose transformers is the oldest release supported (5.17), set by .ci/run: a processor saved with the
# installed transformers must load there too, as a checkpoint pushed with a newer release is pulled with an older one.
OLDEST_PYTHON = os.environ.get("CROSSLMM_OLDEST_TRANSFORMERS_PYTHON")


@pytest.fixture(scope="session")
def clips(tmp_path_factory):
    """Every test video, encoded once (64x48, 10 fps, frame i shows i)."""
    root = tmp_path_factory.mktemp("videos")
    paths = {
        "h264": encode_video(root / "h264.mp4", 30),
        "vfr": encode_video(root / "vfr.mp4", 5, pts_ms=[0, 100, 150, 700, 1000]),
        "odd": encode_video(root / "odd.mp4", 6, pix_fmt="yuv444p", width=63, height=47),
        "short": encode_video(root / "short.mp4", 3),
        "gray": encode_video(root / "gray.mkv", 6, codec="ffv1", pix_fmt="gray", gray=True),
        "alpha_png": encode_video(root / "alpha_png.mov", 4, codec="png", pix_fmt="rgba", alpha=True),
        "alpha_qtrle": encode_video(root / "alpha_qtrle.mov", 4, codec="qtrle", pix_fmt="argb", alpha=True),
        "empty": encode_empty_video(root / "empty.avi", codec="mpeg4"),
        "audio": encode_audio_only(root / "audio.wav"),
    }
    if has_encoder("mpeg4"):
        paths["mpeg4"] = encode_video(root / "mpeg4.avi", 30, codec="mpeg4")
    if has_encoder("libvpx-vp9"):
        paths["vp9"] = encode_video(root / "vp9.webm", 30, codec="libvpx-vp9")
    # File names stay neutral: the error messages quote them, and tests look for words in the messages.
    faststart = encode_video(root / "indexed.mp4", 30, container_options={"movflags": "faststart"})
    paths["truncated"] = truncate(faststart, root / "cut_a.mp4")  # index up front lists frames that are gone
    paths["truncated_tail"] = truncate(paths["h264"], root / "cut_b.mp4")  # lost its index at the end
    paths["corrupt"] = corrupt(paths["h264"], root / "noisy.mp4")
    (root / "notes.mp4").write_text("not a video at all\n")
    paths["text"] = root / "notes.mp4"
    return {name: str(path) for name, path in paths.items()}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def processor(tokenizer):
    """The tiny model's processor: 28 px frames, 2 x 2 tokens per frame."""
    return processor_for_config(tiny_config(), tokenizer)


def sample(video, **kwargs):
    """Raw RGB frames and metadata, sampled as the video processor samples."""
    processor = CrossLMMVideoProcessor()
    return read_video(video, lambda metadata: processor.sample_frames(metadata, **kwargs))


def shown(frames):
    return [read_index(frame) for frame in frames]


# ---- sampling -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["h264", "mpeg4", "vp9"])
def test_uniform_sampling_returns_the_right_frames_in_every_codec(clips, codec):
    if codec not in clips:
        pytest.skip(f"the local FFmpeg has no {codec} encoder")
    frames, metadata = sample(clips[codec], num_frames=5)
    assert frames.shape == (5, 48, 64, 3) and frames.dtype == np.uint8
    assert metadata.total_num_frames == 30 and metadata.duration == pytest.approx(3.0)
    assert metadata.frames_indices == [0, 7, 14, 22, 29]  # both ends included, as LLaVA-OneVision samples
    assert shown(frames) == metadata.frames_indices
    assert metadata.timestamps == pytest.approx([0.0, 0.7, 1.4, 2.2, 2.9])
    assert metadata.requested_num_frames == 5
    assert metadata.frame_times == pytest.approx([i / 10 for i in range(30)])  # every frame's time, from the reader


def test_fps_sampling_and_max_frames(clips):
    frames, metadata = sample(clips["h264"], fps=2)
    assert metadata.frames_indices == [0, 5, 10, 15, 20, 25] == shown(frames)
    assert metadata.timestamps == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    frames, metadata = sample(clips["h264"], fps=2, max_frames=3)
    assert metadata.frames_indices == [0, 10, 25] == shown(frames)  # 3 of the 6 targets, spread evenly
    assert metadata.requested_num_frames == 3


def test_time_window(clips):
    frames, metadata = sample(clips["h264"], num_frames=3, start_time=1.0, end_time=2.0)
    assert metadata.frames_indices == [10, 14, 19] == shown(frames)
    assert (metadata.start_time, metadata.end_time) == (1.0, 2.0)
    _, metadata = sample(clips["h264"], fps=1, start_time=1.5)
    assert metadata.frames_indices == [15, 25]
    # A window running past the end is clipped to the video.
    _, metadata = sample(clips["h264"], num_frames=2, start_time=2.0, end_time=60)
    assert metadata.frames_indices == [20, 29] and metadata.end_time == pytest.approx(3.0)


def test_the_sampler_is_a_function_of_the_frame_times_and_writes_no_metadata(clips):
    """The reader lists the frames' times; the sampler only reads them and returns its selection."""
    times = [0.0, 0.1, 0.15, 0.7, 1.0]  # variable frame rate
    selection = sample_frame_indices(5, times, 1.1, fps=2)
    assert selection == FrameSelection([0, 3, 4], requested_num_frames=3)
    assert sample_frame_indices(5, times, 1.1, num_frames=2, start_time=0.1, end_time=0.8) == FrameSelection(
        [1, 3], requested_num_frames=2, start_time=0.1, end_time=0.8
    )
    _, metadata = read_video(clips["vfr"])  # every frame, no sampler
    before = dict(metadata)
    CrossLMMVideoProcessor().sample_frames(metadata, fps=2)
    assert dict(metadata) == before


def test_seeking_gives_the_exact_pixels_of_a_full_sequential_decode(tmp_path):
    """B-frames, a keyframe every 12 frames, frames picked out of order of GOPs: same pixels as decoding everything."""
    import av

    path = str(encode_video(tmp_path / "bframes.mp4", 60, options={"g": "12", "bf": "3"}))
    with av.open(path) as container:
        everything = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    picked = [3, 5, 13, 26, 27, 47, 59]
    frames, metadata = read_video(path, lambda metadata: picked)
    assert metadata.frames_indices == picked
    assert np.array_equal(frames, np.stack([everything[i] for i in picked]))


def test_sparse_sampling_seeks_instead_of_decoding_everything(tmp_path, monkeypatch):
    """A keyframe every 10 frames: 4 samples out of 120 decode at most a GOP each, and are exactly the frames asked."""
    import video_processing_crosslmm

    decoded = []
    original = video_processing_crosslmm._decoded_frames

    def counting(*args):
        for frame in original(*args):
            decoded.append(frame.pts)
            yield frame

    monkeypatch.setattr(video_processing_crosslmm, "_decoded_frames", counting)
    path = encode_video(tmp_path / "keyframes.mp4", 120, options={"g": "10"})
    frames, metadata = sample(str(path), num_frames=4)
    assert metadata.frames_indices == [0, 40, 79, 119] == shown(frames)
    assert len(decoded) <= 4 * 10, len(decoded)


# ---- real-world files -----------------------------------------------------------------------------------------------


def test_variable_frame_rate_timestamps_come_from_pts(clips):
    frames, metadata = sample(clips["vfr"], num_frames=10)
    assert metadata.timestamps == pytest.approx([0.0, 0.1, 0.15, 0.7, 1.0])
    assert shown(frames) == [0, 1, 2, 3, 4]
    frames, metadata = sample(clips["vfr"], fps=2)  # targets 0, 0.5, 1.0 s: the nearest frames
    assert metadata.frames_indices == [0, 3, 4] == shown(frames)


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_rotation_metadata_is_applied(tmp_path, rotation):
    """The display matrix says how far to turn the stored picture counter-clockwise (phones record portrait as -90)."""
    path = encode_video(tmp_path / "rotated.mp4", 6, rotation=rotation)
    frames, metadata = sample(str(path), num_frames=3)
    assert metadata.rotation == rotation % 360
    expected_shape = (48, 64, 3) if rotation == 180 else (64, 48, 3)
    assert frames.shape[1:] == expected_shape and (metadata.height, metadata.width) == expected_shape[:2]
    upright = [np.rot90(frame, k=-rotation // 90) for frame in frames]  # undo the turn: the bars read again
    assert shown(upright) == metadata.frames_indices == [0, 2, 5]


def test_odd_sizes(clips, processor):
    frames, metadata = sample(clips["odd"], num_frames=3)
    assert frames.shape == (3, 47, 63, 3) and shown(frames) == [0, 2, 5]
    out = processor.video_processor([clips["odd"]], num_frames=3, return_tensors="pt")
    assert out["pixel_values_videos"].shape == (1, 3, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_grayscale_becomes_rgb(clips):
    frames, _ = sample(clips["gray"], num_frames=6)
    assert frames.shape == (6, 48, 64, 3)
    assert (frames[..., 0] == frames[..., 1]).all() and (frames[..., 1] == frames[..., 2]).all()
    assert shown(frames) == list(range(6))


@pytest.mark.parametrize("name", ["alpha_png", "alpha_qtrle"])
def test_alpha_is_blended_over_white(clips, name):
    frames, _ = sample(clips[name], num_frames=4)
    assert frames.shape == (4, 48, 64, 3)
    assert (frames[:, :24] == 255).all()  # the transparent top half
    assert shown(frames[:, 24:]) == [0, 1, 2, 3]  # the opaque bottom half still shows the bars
    assert (frames[0, 24:] == 0).all()  # frame 0: all bars black


def test_short_video_gives_what_exists_and_says_so(clips, processor):
    frames, metadata = sample(clips["short"], num_frames=8)
    assert len(frames) == 3 and metadata.frames_indices == [0, 1, 2]
    assert metadata.requested_num_frames == 8
    out = processor.video_processor([clips["short"]], num_frames=8, return_tensors="pt", return_metadata=True)
    assert out["pixel_values_videos"].shape[1] == 3
    assert out["video_metadata"][0].requested_num_frames == 8


def test_frame_arrays_are_sampled_too(processor):
    video = np.stack([np.full((48, 64, 3), i * 8, dtype=np.uint8) for i in range(20)])
    out = processor.video_processor([video], num_frames=4, return_tensors="pt", return_metadata=True)
    assert out["pixel_values_videos"].shape == (1, 4, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert list(out["video_metadata"][0].frames_indices) == [0, 6, 13, 19]


# ---- bad inputs -----------------------------------------------------------------------------------------------------


def one_line_error(error_type, fn, *needles):
    with pytest.raises(error_type) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.mark.parametrize(
    "name, error_type, needle",
    [
        ("text", VideoLoadError, "is not a video"),
        ("audio", VideoLoadError, "has no video stream"),
        ("truncated", VideoLoadError, "is truncated or corrupt: its header lists 30 frames but only"),
        ("truncated_tail", VideoLoadError, "corrupt/truncated"),
        ("corrupt", VideoLoadError, "corrupt"),
        ("empty", VideoLoadError, "no decodable video frames"),
    ],
)
def test_unusable_files_raise_one_clear_error_naming_the_file(clips, processor, name, error_type, needle):
    path = clips[name]
    one_line_error(error_type, lambda: processor.video_processor([path], num_frames=4), needle, path)
    assert issubclass(VideoLoadError, ValueError)


def test_missing_file(processor, tmp_path):
    missing = str(tmp_path / "nowhere.mp4")
    one_line_error(FileNotFoundError, lambda: processor.video_processor([missing]), missing)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"num_frames": 0}, "num_frames"),
        ({"num_frames": -3}, "num_frames"),
        ({"fps": 0.0}, "fps"),
        ({"start_time": 5.0}, "outside the video"),
        ({"start_time": 2.0, "end_time": 1.0}, "outside the video"),
        ({"start_time": -1.0}, "outside the video"),
    ],
)
def test_bad_sampling_arguments(clips, processor, kwargs, needle):
    one_line_error(ValueError, lambda: processor.video_processor([clips["h264"]], **kwargs), needle)


def test_time_sampling_of_frame_arrays_needs_their_frame_rate(processor):
    video = np.zeros((20, 48, 64, 3), np.uint8)
    one_line_error(ValueError, lambda: processor.video_processor([video], fps=2), "frame rate")
    one_line_error(ValueError, lambda: processor.video_processor([video[:0]]), "has no frames")
    out = processor.video_processor([video], fps=2, video_metadata=[{"total_num_frames": 20, "fps": 10.0}])
    assert len(out["pixel_values_videos"][0]) == 4  # 2 s at 2 fps


def test_placeholder_and_media_counts_must_match(clips, processor):
    video = clips["short"]
    one_line_error(ValueError, lambda: processor(text="<video><video> two?", videos=[video]), "<video>")
    one_line_error(ValueError, lambda: processor(text="none here", videos=[video]), "<video>")
    one_line_error(ValueError, lambda: processor(text="<video> where?"), "1 <video> placeholder(s) but 0 video(s)")
    one_line_error(
        ValueError, lambda: processor(text="<image>", images=[np.zeros((8, 8, 3), np.uint8)] * 2), "<image>"
    )
    one_line_error(ValueError, lambda: processor(videos=[video]), "without a prompt")


def test_tokenizer_without_placeholders_is_refused():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>")), unk_token="<unk>"
    )
    one_line_error(ValueError, lambda: CrossLMMProcessor(tokenizer=bare), "'<image>'")


# ---- expansion and layouts ------------------------------------------------------------------------------------------


def test_placeholders_expand_to_frames_times_pool_size_squared(clips, processor):
    out = processor(
        text="<video> and <image>?",
        videos=[clips["h264"]],
        images=[np.zeros((20, 30, 3), np.uint8)],
        num_frames=5,
        return_tensors="pt",
    )
    ids = out["input_ids"][0]
    assert (ids == processor.video_token_id).sum() == 5 * 4
    assert (ids == processor.image_token_id).sum() == 4
    assert out["pixel_values_videos"].shape == (1, 5, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert out["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert "video_num_frames" not in out
    # Normalised with mean/std 0.5: values in [-1, 1].
    assert out["pixel_values_videos"].min() >= -1 and out["pixel_values_videos"].max() <= 1


def test_placeholder_counts_without_processing_match_the_expansion(clips, processor):
    """`_get_num_multimodal_tokens`, as serving code calls it, counts what the processor puts in the prompt."""
    image = np.zeros((20, 30, 3), np.uint8)
    out = processor(text="<video> and <image>?", videos=[clips["h264"]], images=[image], num_frames=5)
    counts = processor._get_num_multimodal_tokens(image_sizes=[(20, 30)], video_sizes=[(5, 48, 64), (2, 480, 640)])
    assert counts.num_video_tokens[0] == int((out["input_ids"] == processor.video_token_id).sum()) == 5 * 4
    assert counts.num_video_tokens[1] == 2 * 4
    assert counts.num_image_tokens == [int((out["input_ids"] == processor.image_token_id).sum())] == [4]
    assert counts.num_image_patches == [1]


def test_batch_with_unequal_frame_counts_is_padded_with_video_num_frames(clips, processor):
    out = processor(
        text=["<video> first, then <video>", "<video> alone", "no media"],
        videos=[[clips["h264"], clips["short"]], [clips["h264"]], []],
        num_frames=4,
        return_tensors="pt",
    )
    assert out["pixel_values_videos"].shape == (3, 4, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert out["video_num_frames"].tolist() == [4, 3, 4]
    assert (out["pixel_values_videos"][1, 3] == 0).all()  # padding
    counts = (out["input_ids"] == processor.video_token_id).sum(1).tolist()
    assert counts == [(4 + 3) * 4, 4 * 4, 0]
    assert out["input_ids"].shape == out["attention_mask"].shape and out["input_ids"].shape[0] == 3


def test_same_frame_counts_stack_without_video_num_frames(clips, processor):
    out = processor(
        text=["<video>", "<video>"], videos=[clips["h264"], clips["vfr"]], num_frames=4, return_tensors="pt"
    )
    assert out["pixel_values_videos"].shape == (2, 4, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert "video_num_frames" not in out


def test_processor_defaults_are_siglip_384():
    video, image = CrossLMMVideoProcessor(), CrossLMMImageProcessor()
    for part in (video, image):
        assert part.size["height"] == part.size["width"] == 384
        assert list(part.image_mean) == list(part.image_std) == [0.5, 0.5, 0.5]
        assert part.rescale_factor == 1 / 255 and int(part.resample) == 3  # bicubic
    assert video.do_sample_frames and video.num_frames == 32


def test_model_input_names_and_decoding(processor, tokenizer):
    names = processor.model_input_names
    for name in ("input_ids", "attention_mask", "pixel_values", "pixel_values_videos", "video_num_frames"):
        assert name in names
    ids = tokenizer(["a cat", "the ball"], padding=True, return_tensors="pt")["input_ids"]
    assert processor.post_process_image_text_to_text(ids) == tokenizer.batch_decode(ids, skip_special_tokens=True)
    assert processor.batch_decode(ids, skip_special_tokens=True) == ["a cat", "the ball"]


# ---- chat template into the model -----------------------------------------------------------------------------------


def test_chat_template_renders_chatml(processor):
    text = processor.apply_chat_template(video_question({"path": "x.mp4"}), add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<video>\nWhat happens in this video?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert processor.chat_template == CHAT_TEMPLATE


def test_apply_chat_template_loads_samples_tokenises_and_feeds_the_model(clips, processor, tokenizer):
    config = tiny_config(
        text={"vocab_size": len(tokenizer)},
        image_token_id=processor.image_token_id,
        video_token_id=processor.video_token_id,
    )
    model = tiny_model(config, gates=0.3)
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "video", "path": clips["h264"]},
                {"type": "image", "image": np.full((20, 30, 3), 200, np.uint8)},
                {"type": "video", "video": np.zeros((6, 48, 64, 3), np.uint8)},
                {"type": "text", "text": "Compare them."},
            ],
        }
    ]
    inputs = processor.apply_chat_template(
        conversation, tokenize=True, return_dict=True, add_generation_prompt=True, num_frames=3
    )
    assert inputs["pixel_values_videos"].shape == (2, 3, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert (inputs["input_ids"] == processor.video_token_id).sum() == 2 * 3 * 4
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(tokenizer)) and torch.isfinite(logits).all()
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 3)
    assert isinstance(processor.post_process_image_text_to_text(generated[:, inputs["input_ids"].shape[1] :])[0], str)


def test_batched_chat_with_unequal_videos_feeds_the_model(clips, processor, tokenizer):
    config = tiny_config(
        text={"vocab_size": len(tokenizer)},
        image_token_id=processor.image_token_id,
        video_token_id=processor.video_token_id,
    )
    model = tiny_model(config, gates=0.3)
    batch = [video_question(clips["h264"]), video_question({"url": "file://" + clips["short"]}, "And this one?")]
    inputs = processor.apply_chat_template(
        batch, tokenize=True, return_dict=True, add_generation_prompt=True, num_frames=5, return_tensors="pt"
    )
    assert inputs["video_num_frames"].tolist() == [5, 3]
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


# ---- saved folder through the Auto classes --------------------------------------------------------------------------


def check_saved_processor(folder):
    """The files a processor's save_pretrained writes, the Auto classes named where each part loads them from."""
    files = {p.name for p in folder.iterdir()}
    assert {
        "processor_config.json",
        "video_preprocessor_config.json",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "processing_crosslmm.py",
        "video_processing_crosslmm.py",
    } <= files, files
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["pool_size"] == 2
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_crosslmm.CrossLMMProcessor"
    video_config = json.loads((folder / "video_preprocessor_config.json").read_text())
    assert video_config["auto_map"]["AutoVideoProcessor"] == "video_processing_crosslmm.CrossLMMVideoProcessor"
    image_config = json.loads((folder / "preprocessor_config.json").read_text())
    assert image_config["auto_map"]["AutoImageProcessor"] == "processing_crosslmm.CrossLMMImageProcessor"


def assert_loads_as_processor(report, loaded, processor, job):
    """What a fresh process reported (`isolated.LOAD_AS_USERS_DO`, "processor") is `processor` from its own code."""
    assert report["class"] == "CrossLMMProcessor"
    assert report["module"].startswith("transformers_modules"), report["module"]
    assert report["pool_size"] == 2 and report["height"] == IMAGE_SIZE
    assert report["AutoVideoProcessor"] == "CrossLMMVideoProcessor"
    assert report["AutoImageProcessor"] == "CrossLMMImageProcessor"
    expected = processor.apply_chat_template(
        job["conversation"],
        tokenize=True,
        return_dict=True,
        add_generation_prompt=True,
        processor_kwargs={"num_frames": job["num_frames"]},
        return_tensors="pt",
    )
    assert torch.equal(loaded["input_ids"], expected["input_ids"])
    assert torch.allclose(loaded["pixel_values_videos"], expected["pixel_values_videos"], atol=1e-6)


def test_saved_processor_loads_through_auto_classes_without_the_repository(fresh_process, processor):
    """The `processor` part of the fresh process (conftest.py): the tiny checkpoint's processor, the same as this
    module's `processor` (the tiny size's, with the shared tokenizer), saved by build_sample_checkpoint."""
    job = fresh_process.request["processor"]
    check_saved_processor(Path(job["folder"]))
    loaded = torch.load(fresh_process.workdir / "processor-inputs.pt", weights_only=False)
    assert_loads_as_processor(fresh_process.report["processor"], loaded, processor, job)


def test_saved_processor_loads_with_the_oldest_transformers(tiny_files, processor, tmp_path):
    """A processor saved with the installed transformers loads with the oldest release supported, as a checkpoint
    pushed with a newer release is pulled with an older one."""
    if not OLDEST_PYTHON:
        pytest.skip("CROSSLMM_OLDEST_TRANSFORMERS_PYTHON is not set (.ci/run sets it)")
    folder = tmp_path / "crosslmm-processor"
    processor.save_pretrained(folder)
    check_saved_processor(folder)
    job = {"folder": str(folder), "conversation": video_question(tiny_files[1], "Why?"), "num_frames": 4}
    report = load_as_users_do({"processor": job}, tmp_path, python=OLDEST_PYTHON)
    assert report["transformers"].startswith("5.17"), report["transformers"]
    loaded = torch.load(tmp_path / "processor-inputs.pt", weights_only=False)
    assert_loads_as_processor(report["processor"], loaded, processor, job)


def test_the_video_processors_own_options_are_its_valid_kwargs(tmp_path, caplog):
    """`CrossLMMVideoProcessorKwargs`, named as transformers names them, declares the sampling options, so that
    transformers' checks and `from_pretrained(..., option=...)` take them."""
    from video_processing_crosslmm import CrossLMMVideoProcessor, CrossLMMVideoProcessorKwargs

    assert CrossLMMVideoProcessor.valid_kwargs is CrossLMMVideoProcessorKwargs
    assert {"max_frames", "start_time", "end_time", "num_frames", "fps"} <= set(
        CrossLMMVideoProcessorKwargs.__annotations__
    )
    CrossLMMVideoProcessor().save_pretrained(tmp_path)
    with caplog.at_level("WARNING"):
        loaded = CrossLMMVideoProcessor.from_pretrained(tmp_path, max_frames=8, start_time=1.5)
    assert (loaded.max_frames, loaded.start_time) == (8, 1.5)
    assert "valid_kwargs" not in caplog.text

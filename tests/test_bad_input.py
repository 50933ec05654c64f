"""Bad input through the entry points users call: damaged WebM/MKV files, sampling options whose work has no bound,
frames given as float arrays, a folder given as a video. Each is a clear error naming the problem (or, for floats in
[0, 1], correct handling with a warning), never a traceback from inside PyAV, numpy or torch, nor a silent wrong
answer; the work is bounded by the frames the video really has."""

import re
import tracemalloc

import numpy as np
import pytest
import torch

from crosslmm.answer import main as answer_main
from crosslmm.convert.write import processor_for_config
from crosslmm.samples import build_tokenizer
from tiny import tiny_config
from video_processing_crosslmm import CrossLMMVideoProcessor, VideoLoadError, read_video
from videos import encode_video, has_encoder, index_frame, truncate


def corrupt_middle(src, dst, seed: int = 0, length: int = 200):
    """Copy `src` to `dst` with `length` random bytes written over its middle (a disk or download error)."""
    data = bytearray(open(src, "rb").read())
    middle = len(data) // 2
    data[middle : middle + length] = np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8).tobytes()
    with open(dst, "wb") as f:
        f.write(bytes(data))
    return dst


@pytest.fixture(scope="module")
def processor():
    """The tiny model's processor: 28 px frames."""
    return processor_for_config(tiny_config(), build_tokenizer())


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """Matroska files (MKV with H.264, WebM with VP9), 10 s at 10 fps, cut in half or with bytes overwritten in the
    middle. Their headers carry no frame count (MP4's does): the duration and the demuxer's errors must tell."""
    root = tmp_path_factory.mktemp("damaged")
    sources = {"mkv": encode_video(root / "whole.mkv", 100)}
    if has_encoder("libvpx-vp9"):
        sources["webm"] = encode_video(root / "whole.webm", 100, codec="libvpx-vp9")
    files = {}
    for kind, source in sources.items():
        files[f"{kind}-cut"] = str(truncate(source, root / f"cut.{kind}"))
        files[f"{kind}-noise"] = str(corrupt_middle(source, root / f"noise.{kind}"))
        files[f"{kind}-noise-again"] = str(corrupt_middle(source, root / f"noise-again.{kind}"))
    return sources, files


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


# ---- damaged Matroska -----------------------------------------------------------------------------------------------


def test_whole_matroska_files_read_in_full(damaged, processor):
    sources, _ = damaged
    for source in sources.values():
        frames, metadata = read_video(source)
        assert len(frames) == metadata.total_num_frames == 100 and metadata.duration == pytest.approx(10.0)


@pytest.mark.parametrize("kind", ["mkv", "webm"])
def test_truncated_matroska_is_refused_naming_what_is_missing(damaged, processor, kind):
    _, files = damaged
    if f"{kind}-cut" not in files:
        pytest.skip(f"no {kind} encoder in this PyAV build")
    path = files[f"{kind}-cut"]
    with pytest.raises(VideoLoadError) as error:
        processor.video_processor([path], num_frames=8)
    message = one_line(error)
    assert message.startswith(path) and "is truncated or corrupt: its header says 10.000 s but only" in message


@pytest.mark.parametrize("kind", ["mkv", "webm"])
def test_corrupt_bytes_in_matroska_are_refused_every_time(damaged, processor, kind):
    """The same damage in a second file is reported too (FFmpeg's log drops a message equal to the one before)."""
    _, files = damaged
    if f"{kind}-noise" not in files:
        pytest.skip(f"no {kind} encoder in this PyAV build")
    for name in (f"{kind}-noise", f"{kind}-noise-again", f"{kind}-noise"):
        with pytest.raises(VideoLoadError) as error:
            processor.video_processor([files[name]], num_frames=8)
        message = one_line(error)
        assert message.startswith(files[name]) and "is corrupt or truncated" in message, message


def test_crosslmm_answer_refuses_damaged_matroska_in_one_line(tiny_files, damaged, capsys):
    folder, _ = tiny_files
    _, files = damaged
    for path in (files["mkv-cut"], files["mkv-noise"]):
        assert answer_main(["--model", str(folder), "--video", path, "--max-new-tokens", "1"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert re.search(rf"crosslmm-answer: error: {re.escape(path)} is (truncated or corrupt|corrupt or trunc)", err)


# ---- the work is bounded by the frames the video has ----------------------------------------------------------------


@pytest.fixture(scope="module")
def far_apart(tmp_path_factory):
    """A 2-frame MKV of about a kilobyte whose frames are 10^9 s apart."""
    return str(encode_video(tmp_path_factory.mktemp("gap") / "gap.mkv", 2, pts_ms=[0, 10**12]))


@pytest.mark.parametrize("fps", [1.0, 1e8, 1e10, 1e300])
def test_sampling_by_rate_costs_what_the_frames_cost(far_apart, processor, fps):
    """One target time per 1/fps seconds would be 10^9 to 10^309 of them: the sampler works per frame instead."""
    tracemalloc.start()
    try:
        out = processor.video_processor([far_apart], fps=fps)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(out["pixel_values_videos"][0]) == 2
    assert peak < 50 * 2**20, f"{peak / 2**20:.0f} MiB"


def test_sampling_by_rate_picks_the_frame_nearest_each_target_time(processor, tmp_path):
    """The per-frame rule gives what one target per 1/fps seconds gives, on uneven frame times."""
    from video_processing_crosslmm import sample_frame_indices

    rng = np.random.default_rng(0)
    times = np.cumsum(rng.exponential(0.5, 2000)).tolist()
    for fps in (0.05, 0.5, 3.0, 40.0):  # from fewer targets than frames to many targets per frame
        by_targets = sample_frame_indices(len(times), fps=fps, frame_times=times, max_frames=None)
        targets = np.arange(times[0], times[-1] + 1e-9, 1 / fps)
        nearest = sorted({int(np.argmin(np.abs(np.asarray(times) - t))) for t in targets})
        assert list(by_targets) == nearest


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"fps": float("inf")}, "fps must be a finite positive number, got inf"),
        ({"fps": float("nan")}, "fps must be a finite positive number, got nan"),
        ({"fps": -1.0}, "fps must be a finite positive number"),
        ({"fps": 1.0, "max_frames": 0}, "max_frames must be a finite positive number"),
    ],
)
def test_sampling_options_that_are_not_numbers_of_frames(far_apart, processor, kwargs, needle):
    with pytest.raises(ValueError) as error:
        processor.video_processor([far_apart], **kwargs)
    assert needle in one_line(error)


def test_crosslmm_answer_refuses_an_infinite_rate(tiny_files, capsys):
    folder, video = tiny_files
    assert answer_main(["--model", str(folder), "--video", str(video), "--fps", "inf"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "fps" in err.strip().splitlines()[-1]


def test_num_frames_is_capped_at_max_frames(processor, caplog):
    video = np.zeros((300, 28, 28, 3), np.uint8)
    with caplog.at_level("WARNING"):
        out = processor.video_processor([video], num_frames=10_000)
    assert len(out["pixel_values_videos"][0]) == 256
    assert "num_frames=10000 is above max_frames=256: sampling 256 frames" in caplog.text
    out = processor.video_processor([video], num_frames=10_000, max_frames=300)
    assert len(out["pixel_values_videos"][0]) == 300


def test_frames_are_resized_as_they_are_decoded(tmp_path, monkeypatch):
    """A large video never holds its sampled frames at full size: each is resized as it comes out of the decoder,
    to exactly the pixels that resizing the whole decoded video gives."""
    video = str(encode_video(tmp_path / "large.mp4", 12, width=640, height=480))
    processor = CrossLMMVideoProcessor()
    full_size, _ = read_video(video)
    expected = processor([full_size], do_sample_frames=False)["pixel_values_videos"]

    sizes = []
    original = processor.frame_resizer

    def recording_resizer(*args, **kwargs):
        resize = original(*args, **kwargs)
        return lambda image: sizes.append(image.shape) or resize(image)

    monkeypatch.setattr(processor, "frame_resizer", recording_resizer)
    got = processor([video], num_frames=12)["pixel_values_videos"]
    assert sizes == [(480, 640, 3)] * 12  # one frame at a time, at the video's size
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ---- frames given as arrays -----------------------------------------------------------------------------------------


def frames_0_255(count: int = 4, size: int = 28) -> np.ndarray:
    return np.stack([index_frame(i, size, size) for i in range(count)])


def test_float_frames_in_0_1_are_scaled_not_blacked_out(processor, caplog):
    """Floats in [0, 1] (as torchvision and many pipelines give frames) mean what uint8 frames 0-255 mean."""
    frames = frames_0_255()
    expected = processor.video_processor([frames])["pixel_values_videos"]
    for floats in (frames / 255.0, torch.from_numpy(frames / 255.0).float()):
        with caplog.at_level("WARNING"):
            got = processor.video_processor([floats])["pixel_values_videos"]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert "float pixels in [0, 1]: taken as scaled to [0, 1] already" in caplog.text
    # Floats in 0-255 are taken as they are.
    torch.testing.assert_close(processor.video_processor([frames.astype(np.float32)])["pixel_values_videos"], expected)


def test_float_images_in_0_1_are_scaled_too(processor):
    image = index_frame(5, 28, 28)
    expected = processor.image_processor(image)["pixel_values"]
    torch.testing.assert_close(processor.image_processor(image / 255.0)["pixel_values"], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda f: f / 127.5 - 1, "has float pixels in [-1, 1]: normalized already?"),
        (lambda f: np.where(f == f.max(), np.nan, f / 255.0), "holds NaN or infinite pixel values"),
        (lambda f: np.full(f.shape, np.inf, np.float32), "holds NaN or infinite pixel values"),
    ],
)
def test_float_frames_that_cannot_be_pixels_are_refused(processor, make, needle):
    with pytest.raises(ValueError) as error:
        processor.video_processor([make(frames_0_255())])
    message = one_line(error)
    assert message.startswith("Video 0 (an array of frames)") and needle in message
    with pytest.raises(ValueError) as error:
        processor.image_processor(make(frames_0_255(4))[3])
    assert needle in one_line(error)


def test_metadata_that_contradicts_the_frames_is_refused(processor):
    with pytest.raises(ValueError) as error:
        processor.video_processor([frames_0_255(4)], video_metadata=[{"total_num_frames": 9, "fps": 10.0}], fps=2)
    assert "video_metadata of video 0 says 9 frames, but the array has 4" in one_line(error)


# ---- a folder is not a video ----------------------------------------------------------------------------------------


def test_a_folder_given_as_a_video_is_named_as_a_folder(processor, tmp_path, tiny_files, capsys):
    with pytest.raises(IsADirectoryError) as error:
        processor.video_processor([str(tmp_path)])
    assert one_line(error) == f"{tmp_path} is a directory, not a video file."
    folder, _ = tiny_files
    assert answer_main(["--model", str(folder), "--video", str(tmp_path)]) == 2
    assert f"crosslmm-answer: error: not a file: {tmp_path}" in capsys.readouterr().err

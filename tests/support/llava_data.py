"""A tiny training set in the LLaVA-NeXT / LLaVA-Video format, generated here: H.264 videos of a coloured square
moving left or right (encoded with PyAV), a few PNG images, text-only samples, one sample whose video is missing and
one whose video is corrupt; JSON, JSONL and YAML-mixture annotation files; and a tiny CrossLMM checkpoint to train."""

import json
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from crosslmm.answer import main as answer_main  # noqa: F401  (crosslmm-answer, for the tests that load checkpoints)
from crosslmm.samples import build_sample_checkpoint


COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (40, 80, 230)}
DIRECTIONS = ("left", "right")
SIZE = 64
NUM_FRAMES = 8


def build_tiny_checkpoint(folder) -> Path:
    """The tests' tiny geometry (crosslmm.samples), small enough for a training step in a fraction of a second, with
    the LM head tied to the embeddings as in Qwen2.5-1.5B."""
    return build_sample_checkpoint(folder, "tiny", text={"tie_word_embeddings": True})


def square_frames(colour: str, direction: str, num_frames: int = NUM_FRAMES, size: int = SIZE) -> np.ndarray:
    """(frames, H, W, 3) uint8: a square of `colour` crossing a dark frame to the `direction`."""
    video = np.full((num_frames, size, size, 3), 20, dtype=np.uint8)
    side = size // 4
    for t in range(num_frames):
        progress = t / max(num_frames - 1, 1)
        x = round(progress * (size - side)) if direction == "right" else round((1 - progress) * (size - side))
        video[t, size // 2 - side // 2 : size // 2 + side // 2, x : x + side] = COLOURS[colour]
    return video


def encode(path, frames: np.ndarray, fps: int = 8) -> Path:
    """H.264 in MP4, lossless (the decoded frames are the drawn ones, on every machine)."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"qp": "0"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv444p"
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return Path(path)


def video_sample(sample_id, path, question, answer):
    return {
        "id": sample_id,
        "video": path,
        "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}],
    }


def build_dataset(root) -> dict:
    """Write videos/, images/, train.json (videos), images.jsonl (images and text-only) and mixture.yaml under
    `root`. Returns the paths and the sample counts."""
    root = Path(root)
    videos, images = root / "videos", root / "images"
    (videos / "clips").mkdir(parents=True, exist_ok=True)
    images.mkdir(parents=True, exist_ok=True)
    samples = []
    for colour in COLOURS:
        for direction in DIRECTIONS:
            name = f"clips/{colour}-{direction}.mp4"
            encode(videos / name, square_frames(colour, direction))
            samples.append(
                video_sample(f"{colour}-{direction}-colour", name, "What colour is the square?", f"It is {colour}.")
            )
            samples.append(
                video_sample(
                    f"{colour}-{direction}-way", name, "Which way does the square move?", f"It moves {direction}."
                )
            )
    # One video that is not there, one that is cut short (its MP4 index lost), one of a single frame.
    samples.append(video_sample("missing", "clips/missing.mp4", "What colour is the square?", "It is red."))
    data = (videos / "clips/red-left.mp4").read_bytes()
    (videos / "clips/corrupt.mp4").write_bytes(data[: len(data) // 3])
    samples.append(video_sample("corrupt", "clips/corrupt.mp4", "What colour is the square?", "It is red."))
    encode(videos / "clips/short.mp4", square_frames("green", "left", num_frames=1))
    samples.append(video_sample("short", "clips/short.mp4", "What colour is the square?", "It is green."))
    (root / "train.json").write_text(json.dumps(samples, indent=1))

    lines = []
    for colour, rgb in COLOURS.items():
        image = np.full((SIZE, SIZE, 3), 20, dtype=np.uint8)
        image[16:48, 16:48] = rgb
        Image.fromarray(image).save(images / f"{colour}.png")
        lines.append(
            {
                "id": f"image-{colour}",
                "image": f"{colour}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is the square?"},
                    {"from": "gpt", "value": f"The square is {colour}."},
                ],
            }
        )
    for number, (question, answer) in enumerate([("Say hello.", "Hello."), ("Count to three.", "One, two, three.")]):
        lines.append(
            {
                "id": f"text-{number}",
                "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
            }
        )
    (root / "images.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (root / "mixture.yaml").write_text(
        "datasets:\n"
        "  - json_path: train.json\n"
        "    sampling_strategy: all\n"
        "  - json_path: images.jsonl\n"
        "    sampling_strategy: first:100%\n"
    )
    return {
        "root": root,
        "videos": videos,
        "images": images,
        "json": root / "train.json",
        "jsonl": root / "images.jsonl",
        "yaml": root / "mixture.yaml",
        "video_samples": len(samples),
        "other_samples": len(lines),
    }


@pytest.fixture(scope="session", name="tiny_checkpoint")
def tiny_checkpoint_fixture(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "checkpoint")


@pytest.fixture(scope="session", name="dataset")
def dataset_fixture(tmp_path_factory) -> dict:
    return build_dataset(tmp_path_factory.mktemp("llava-data"))

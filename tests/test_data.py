"""crosslmm.train.data: LLaVA-NeXT / LLaVA-Video annotation files and mixtures, their validation, lazy frame decoding
with bad samples skipped, and the length-grouped sampler."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoProcessor

from crosslmm.train.data import (
    DataError,
    LengthGroupedSampler,
    PackedRecords,
    VideoChatDataset,
    check_media,
    load_training_data,
    parse_sample,
    read_sources,
    select,
)
from crosslmm.train.trainer import CrossLMMDataCollator
from llava_data import SIZE, dataset_fixture, tiny_checkpoint_fixture  # noqa: F401  (pytest fixtures)


def load(data, paths=None, **kwargs):
    sources = read_sources(paths or [str(data["yaml"])], str(data["videos"]), str(data["images"]))
    return load_training_data(sources, **kwargs)


# ---- files, mixtures, validation ----------------------------------------------------------------------------------


def test_json_jsonl_and_yaml_mixture_load_every_sample(dataset):
    mixture = load(dataset)
    assert len(mixture) == dataset["video_samples"] + dataset["other_samples"]
    assert mixture.counts() == {"text": 2, "video": dataset["video_samples"], "image": 3}
    both = load(dataset, [str(dataset["json"]), str(dataset["jsonl"])])
    assert [both.records[i] for i in range(len(both))] == [mixture.records[i] for i in range(len(mixture))]
    first = mixture.records[0]
    assert first["r"]["id"] == "red-left-colour" and first["s"] == 0 and first["i"] == 0


def test_sampling_strategies_follow_llava_next_and_are_seeded():
    assert select(10, "all", 0) == list(range(10))
    assert select(10, "first:3", 0) == [0, 1, 2] and select(10, "end:3", 0) == [7, 8, 9]
    assert select(10, "first:25%", 0) == [0, 1, 2]  # ceil(2.5), as LLaVA-NeXT rounds
    assert select(10, "end:100%", 0) == list(range(10)) and select(3, "first:10", 0) == [0, 1, 2]
    picked = select(100, "random:10", seed=1, name="a.json")
    assert len(picked) == 10 and picked == sorted(picked) and picked == select(100, "random:10", 1, "a.json")
    assert picked != select(100, "random:10", seed=2, name="a.json")
    assert picked != select(100, "random:10", seed=1, name="b.json")


def test_mixture_paths_and_folders_relative_to_the_yaml(dataset, tmp_path):
    (tmp_path / "mix").mkdir()
    (tmp_path / "mix" / "mixture.yaml").write_text(
        "datasets:\n"
        f"  - json_path: {dataset['json']}\n"
        "    sampling_strategy: end:2\n"
        f"    video_folder: {dataset['videos']}\n"
        "  - json_path: ../local.jsonl\n"
        "    sampling_strategy: random:50%\n"
    )
    (tmp_path / "local.jsonl").write_text(dataset["jsonl"].read_text())
    sources = read_sources([str(tmp_path / "mix" / "mixture.yaml")])
    assert [source.sampling_strategy for source in sources] == ["end:2", "random:50%"]
    assert sources[0].video_folder == dataset["videos"] and sources[1].video_folder is None
    data = load_training_data(sources, seed=0)
    assert data.per_source == [2, 3] and [data.records[i]["r"]["id"] for i in range(2)] == ["corrupt", "short"]


def test_a_llava_conversation_becomes_chat_messages():
    sample = parse_sample(
        {
            "video": "v.mp4",
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "<image>\nWhat happens?"},
                {"from": "gpt", "value": "A square moves."},
                {"from": "human", "value": "And then?"},
                {"from": "gpt", "value": "It stops."},
            ],
        }
    )
    assert sample.kind == "video" and sample.visuals == ["v.mp4"]
    assert [m["role"] for m in sample.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert sample.messages[1]["content"] == [{"type": "video"}, {"type": "text", "text": "What happens?"}]
    assert sample.messages[2]["content"] == [{"type": "text", "text": "A square moves."}]
    images = parse_sample(
        {
            "image": ["a.jpg", "b.jpg"],
            "conversations": [
                {"from": "human", "value": "Compare <image> with <image>."},
                {"from": "gpt", "value": "Same."},
            ],
        }
    )
    assert [item["type"] for item in images.messages[0]["content"]] == ["text", "image", "text", "image", "text"]
    text = parse_sample({"conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello"}]})
    assert text.kind is None and text.visuals == []


BAD_SAMPLES = [
    ({"id": "x", "video": "v.mp4", "conversations": [{"from": "human", "value": "<image>\nQ"}]}, "has no reply"),
    (
        {"video": "v.mp4", "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": " "}]},
        "has no reply",
    ),
    (
        {"video": "v.mp4", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        r"has 0 <image>/<video> placeholder\(s\) but 1 video",
    ),
    (
        {"image": ["a", "b"], "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A"}]},
        r"has 1 <image>/<video> placeholder\(s\) but 2 images",
    ),
    (
        {"conversations": [{"from": "human", "value": "<image> Q"}, {"from": "gpt", "value": "A"}]},
        "but no video or image",
    ),
    ({"video": "v", "image": "i", "conversations": []}, "has both 'video' and 'image'"),
    ({"conversations": [{"from": "robot", "value": "Q"}, {"from": "gpt", "value": "A"}]}, "is from 'robot'"),
    ({"id": 3}, "has no 'conversations'"),
    (["not", "an", "object"], "is a JSON list"),
]


@pytest.mark.parametrize("record, message", BAD_SAMPLES)
def test_an_unusable_sample_is_one_data_error_naming_it(tmp_path, record, message):
    good = {"id": "ok", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    path = tmp_path / "data.json"
    path.write_text(json.dumps([good, record, record]))
    with pytest.raises(DataError, match=message) as error:
        load_training_data(read_sources([str(path)]))
    assert str(error.value).startswith(f"{path}: sample 1") and "(and 1 more sample(s) with a problem)" in str(
        error.value
    )
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "files, mixture, message",
    [
        ({}, None, "data file not found"),
        ({"data.txt": "x"}, None, "unknown data format '.txt'"),
        ({"data.json": "[]"}, None, "no samples in"),
        ({"data.json": '{"a": 1}'}, None, "expected a JSON list of samples"),
        ({"data.json": "[{,]"}, None, r"data.json:1: not valid JSON"),
        ({"data.jsonl": "{}\n{oops\n"}, None, r"data.jsonl:2: not valid JSON"),
        ({"data.json": "[]"}, "datasets: []\n", "non-empty 'datasets' list"),
        ({"data.json": "[]"}, "datasets:\n  - sampling_strategy: all\n", "dataset 1 has no json_path"),
        ({"data.json": "[]"}, "datasets:\n  - json_path: gone.json\n", "json_path not found"),
        ({"data.json": "[]"}, "datasets:\n  - json_path: data.json\n    sampling_strategy: some\n", "is not all"),
        ({"data.json": "[]"}, "datasets:\n  - json_path: data.json\n    weight: 2\n", r"unknown key\(s\)"),
    ],
)
def test_bad_files_and_mixtures_are_one_data_error(tmp_path, files, mixture, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    target = tmp_path / ("mixture.yaml" if mixture else next(iter(files), "data.json"))
    if mixture:
        target.write_text(mixture)
    with pytest.raises(DataError, match=message) as error:
        load_training_data(read_sources([str(target)]))
    assert "\n" not in str(error.value)


def test_a_wrong_media_folder_is_caught_before_training(dataset, tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        read_sources([str(dataset["json"])], video_folder=str(tmp_path / "nowhere"))
    data = load_training_data(read_sources([str(dataset["json"])], video_folder=str(tmp_path)))
    with pytest.raises(DataError, match=r"none of the .* visual file\(s\) checked exist.*--video-folder"):
        check_media(data)
    warnings = check_media(load(dataset))  # the one missing video of the real folder: a warning, not an error
    assert len(warnings) == 1 and "1 of" in warnings[0] and "missing.mp4" in warnings[0]


def test_packed_records_survive_pickling_into_workers():
    import pickle

    records = PackedRecords([json.dumps({"r": {"id": i, "text": "é" * i}}).encode() for i in range(5)])
    again = pickle.loads(pickle.dumps(records))
    assert [again[i]["r"]["text"] for i in range(5)] == ["é" * i for i in range(5)]


# ---- lazy decoding and bad samples --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return AutoProcessor.from_pretrained(tiny_checkpoint, trust_remote_code=True)


def test_frames_are_decoded_when_a_sample_is_read(dataset, processor, monkeypatch):
    import crosslmm.train.data

    calls = []
    read_video = crosslmm.train.data.read_video
    monkeypatch.setattr(crosslmm.train.data, "read_video", lambda *a, **k: calls.append(a[0]) or read_video(*a, **k))
    data = VideoChatDataset(load(dataset), processor, num_frames=4)
    assert calls == []  # nothing decoded up front
    item = data[1]  # red-left, "Which way does the square move?"
    assert calls == [str(dataset["videos"] / "clips/red-left.mp4")] and item["skipped"] == []
    (video,) = item["videos"]
    frame_size = processor.video_processor.size["height"]  # resized as decoded, from the 64 px of the file
    assert video.shape == (4, frame_size, frame_size, 3) and video.dtype == np.uint8 and frame_size != SIZE
    red = video[..., 0] > 200
    columns = [np.nonzero(red[t].any(axis=0))[0].mean() for t in range(4)]
    assert columns == sorted(columns, reverse=True)  # the square moves left over the sampled frames
    assert item["messages"][-1]["content"] == [{"type": "text", "text": "It moves left."}]
    image = data[dataset["video_samples"]]["images"][0]
    assert image.size == (SIZE, SIZE) and image.mode == "RGB"
    assert "videos" not in data[len(data) - 1] and "images" not in data[len(data) - 1]  # text only


def test_missing_corrupt_and_short_videos_are_replaced_and_reported(dataset, processor):
    data = VideoChatDataset(load(dataset), processor, num_frames=4, min_frames=2)
    missing = dataset["video_samples"] - 3
    item = data[missing]  # replaced by a usable sample drawn from the dataset
    assert [entry["reason"] for entry in item["skipped"]] == ["missing"]  # bad draws count on their own turn
    assert item["skipped"][0]["id"] == "missing" and "missing.mp4" in item["skipped"][0]["detail"]
    assert item["messages"][-1]["role"] == "assistant" and data[missing]["messages"] == item["messages"]
    assert [entry["reason"] for entry in data[missing + 1]["skipped"]] == ["corrupt"]
    short = data[missing + 2]["skipped"]
    assert short[0]["reason"] == "too short" and "1 frame(s), fewer than --min-frames 2" in short[0]["detail"]
    assert VideoChatDataset(load(dataset), processor, num_frames=4)[missing + 2]["videos"][0].shape[0] == 1
    last_video = missing - 1
    item = data.load(last_video)
    length = data.token_count(item)
    assert length == CrossLMMDataCollator(processor)([item])["input_ids"].shape[1]  # exact, placeholders expanded
    limited = VideoChatDataset(load(dataset), processor, num_frames=4, max_length=length - 1)
    item = limited[last_video]  # too long: replaced by a shorter sample
    assert item["skipped"][0]["reason"] == "too long" and f"{length} tokens" in item["skipped"][0]["detail"]
    assert limited.token_count(item) < length


def test_replacements_are_drawn_from_the_whole_dataset_and_give_up_on_unusable_data(dataset, processor, tmp_path):
    data = VideoChatDataset(load(dataset), processor, num_frames=4, min_frames=2)
    draws = [data.replacement(12, attempt) for attempt in range(1, 30)]
    assert data.replacement(12, 0) == 12 and len(set(draws)) > 10  # spread out, not the next ones in a row
    assert draws == [data.replacement(12, attempt) for attempt in range(1, 30)]  # and the same every time
    unusable = VideoChatDataset(load(dataset, [str(dataset["json"])]), processor, num_frames=4, max_attempts=3)
    unusable.data.sources[0] = type(unusable.data.sources[0])(dataset["json"], video_folder=tmp_path)
    with pytest.raises(RuntimeError, match="Sample 0 and 2 samples drawn in its place could not be used"):
        unusable[0]


def test_a_video_given_as_a_folder_of_frames(dataset, processor, tmp_path):
    from PIL import Image

    from llava_data import square_frames

    (tmp_path / "frames" / "clip").mkdir(parents=True)
    for number, frame in enumerate(square_frames("blue", "right", num_frames=10)):
        Image.fromarray(frame).save(tmp_path / "frames" / "clip" / f"{number:03d}.jpg")
    path = tmp_path / "frames.json"
    sample = {
        "video": "clip",
        "conversations": [{"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": "A"}],
    }
    path.write_text(json.dumps([sample]))
    data = load_training_data(read_sources([str(path)], video_folder=str(tmp_path / "frames")))
    assert VideoChatDataset(data, processor, num_frames=4)[0]["videos"][0].shape == (4, SIZE, SIZE, 3)
    assert VideoChatDataset(data, processor, fps=1.0, max_frames=6)[0]["videos"][0].shape == (6, SIZE, SIZE, 3)


def test_worker_processes_give_the_same_batches(dataset, processor):
    data = VideoChatDataset(load(dataset), processor, num_frames=4, min_frames=2)
    collator = CrossLMMDataCollator(processor)
    batches = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=collator, num_workers=workers)
        batches.append(list(loader))
    for one, other in zip(*batches):
        assert one.keys() == other.keys() and one["skipped_samples"] == other["skipped_samples"]
        for key, value in one.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other[key]), key
    skipped = [entry["reason"] for batch in batches[1] for entry in batch["skipped_samples"]]
    assert sorted(skipped) == ["corrupt", "missing", "too short"]


def test_lengths_count_visual_and_text_tokens(dataset, processor):
    data = VideoChatDataset(load(dataset), processor, num_frames=4)
    lengths = data.lengths()
    per_frame = processor.tokens_per_frame
    visual = lengths - data.data.text_chars // 4  # text estimated at 4 characters per token
    video, image, text = 0, dataset["video_samples"], len(data) - 1
    assert (visual[video], visual[image], visual[text]) == (4 * per_frame, per_frame, 0)
    by_rate = VideoChatDataset(load(dataset), processor, fps=2.0, max_frames=12).lengths()
    assert by_rate[video] == lengths[video] + 8 * per_frame  # at most max_frames per video


# ---- the sampler --------------------------------------------------------------------------------------------------


class Epochs:
    epoch = 0


def batches_of(order, size):
    return [order[i : i + size] for i in range(0, len(order), size)]


def test_sampler_order_depends_only_on_seed_and_epoch():
    lengths = np.random.default_rng(0).integers(10, 1000, 103)
    source = Epochs()
    sampler = LengthGroupedSampler(source, lengths, batch_size=4, seed=7, megabatch_size=5)
    first = list(sampler)
    assert sorted(first) == list(range(103))  # each sample exactly once
    assert list(LengthGroupedSampler(Epochs(), lengths, batch_size=4, seed=7, megabatch_size=5)) == first
    sampler.set_epoch(1)
    assert source.epoch == 1 and list(sampler) != first and sorted(sampler) == list(range(103))
    assert list(LengthGroupedSampler(Epochs(), lengths, batch_size=4, seed=8, megabatch_size=5)) != first
    sequential = LengthGroupedSampler(Epochs(), lengths, 4, group_by_length=False, shuffle=False)
    assert list(sequential) == list(range(103))
    shuffled = list(LengthGroupedSampler(Epochs(), lengths, 4, seed=7, group_by_length=False))
    assert shuffled != list(range(103)) and sorted(shuffled) == list(range(103))


def test_length_grouping_cuts_padding_and_puts_the_longest_batch_first():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(20, 200, 300), rng.integers(2000, 6000, 100)])  # text vs long videos
    size = 8

    def padding(order):
        batches = [lengths[batch] for batch in batches_of(order, size)]
        return sum(batch.max() * len(batch) - batch.sum() for batch in batches) / lengths.sum()

    grouped = LengthGroupedSampler(Epochs(), lengths, batch_size=size, seed=0)
    order = grouped.order(0)
    random_order = LengthGroupedSampler(Epochs(), lengths, batch_size=size, seed=0, group_by_length=False).order(0)
    assert padding(order) < 0.2 * padding(random_order), (padding(order), padding(random_order))
    assert lengths[order[:size]].max() == lengths.max()
    odd = LengthGroupedSampler(Epochs(), lengths[:397], batch_size=size, seed=0).order(0)
    assert all(len(batch) == size for batch in batches_of(odd, size)[:-1])  # only the very last batch is short


def test_a_sample_past_max_length_is_skipped_without_tokenizing_it_whole(dataset, processor, tmp_path):
    """A text of 2 million characters against a limit of 1,000 tokens: refused as too long, the tokenizer having seen
    only a beginning of it; a sample that fits is counted exactly."""
    from crosslmm.train.data import BadSample, count_tokens

    seen = []

    def tokenizer(text, **kwargs):
        seen.append(len(text))
        return processor.tokenizer(text, **kwargs)

    huge = "word " * 400_000
    assert count_tokens(tokenizer, huge, limit=1000) > 1000 and max(seen) <= 4 * 1001 * 4
    seen.clear()
    short = "A red square moves to the left. " * 10
    assert count_tokens(tokenizer, short, limit=1000) == len(processor.tokenizer(short)["input_ids"])

    reply = [{"from": "gpt", "value": "Yes."}]
    samples = [{"id": "huge", "conversations": [{"from": "human", "value": huge}, *reply]}]
    path = tmp_path / "huge.json"
    path.write_text(json.dumps(samples))
    data = VideoChatDataset(load_training_data(read_sources([str(path)])), processor, max_length=1000)
    with pytest.raises(BadSample, match="too long: .* tokens or more, more than --max-length 1000"):
        data.load(0)

"""Training data in the formats LLaVA-NeXT and LLaVA-Video ship: reading and validating annotations, the dataset
that decodes frames lazily, and the length-grouped sampler.

A sample is a JSON object

    {"id": "...", "video": "relative/path.mp4" | "image": "x.jpg" | ["a.jpg", "b.jpg"],
     "conversations": [{"from": "human", "value": "<image>\\nWhat happens?"}, {"from": "gpt", "value": "..."}]}

where each `<image>` (or `<video>`) placeholder marks where the sample's next visual goes, whatever its kind; a sample
with neither key is text-only. Samples come in a JSON list, in a JSONL file (one per line), or from a LLaVA-NeXT YAML
mixture of such files:

    datasets:
      - json_path: llava_video_178k/0_30_s_academic_v0_1_cap_processed.json
        sampling_strategy: all        # or first:N, end:N, random:N, with N a count or a percentage ("first:10%")

The annotations are validated as a whole when they are loaded (a bad configuration is one `DataError` before any model
loads) and kept packed in one byte buffer, not as millions of Python objects, so that DataLoader workers share them
instead of copying them page by page. Frames are decoded lazily, in `__getitem__` (which the DataLoader runs in its
workers), with the project's PyAV reader and frame sampler; a sample whose video or image is missing, corrupt or too
short is replaced by another usable one and reported, not fatal. `LengthGroupedSampler` orders samples so that each
global batch holds samples of similar length (visual tokens plus text tokens), and gives the same order for the same
seed and epoch, so that a resumed run sees exactly the data an uninterrupted one would.
"""

import json
import logging
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers.trainer_pt_utils import get_length_grouped_indices

from crosslmm import IMAGE_SUFFIXES
from video_processing_crosslmm import VideoLoadError, read_video


try:
    from av import FFmpegError
except ImportError:  # no PyAV: read_video says so
    FFmpegError = VideoLoadError

# What reading a video or an image can raise for a bad file (anything else is a bug, and stops the run).
VIDEO_ERRORS = (VideoLoadError, FFmpegError, OSError, ValueError, EOFError, RuntimeError)


logger = logging.getLogger(__name__)

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
PLACEHOLDER = re.compile(r"<image>|<video>")  # LLaVA data marks videos with <image> too
STRATEGY = re.compile(r"^(all|first|end|random)(?::(\d+)(%?))?$")
DATA_SUFFIXES = (".json", ".jsonl")
MIXTURE_SUFFIXES = (".yaml", ".yml")
KINDS = (None, "video", "image")  # index stored per sample
TURN_OVERHEAD_TOKENS = 5  # "<|im_start|>role\n" ... "<|im_end|>\n"
CHARS_PER_TOKEN = 4  # a text-length estimate good enough to group samples by length


class DataError(ValueError):
    """A bad data configuration (no such file, no samples, a sample without a reply, placeholders that do not match
    the visuals, ...): reported as one line before any model loads."""


class BadSample(Exception):
    """A sample that cannot be used this time (its video or image is missing, corrupt, too short, or it is too long):
    skipped and counted, not fatal. `reason` is one of "missing", "corrupt", "too short", "too long"."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# --------------------------------------------------------------------------------------------------------------------
# Files and mixtures
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One annotation file and how to sample it, with the folders its relative media paths start from."""

    path: Path
    sampling_strategy: str = "all"
    video_folder: Path | None = None
    image_folder: Path | None = None


def _existing_file(path: Path, what: str, base: Path | None = None) -> Path:
    """`path` as given, else relative to `base` (a mixture's folder); DataError naming it when neither exists."""
    candidates = [path] if path.is_absolute() or base is None else [base / path, path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
        if candidate.exists():
            raise DataError(f"{what} {candidate} is not a file")
    tried = " or ".join(str(candidate) for candidate in candidates)
    raise DataError(f"{what} not found: {tried}")


def read_sources(data: list[str], video_folder: str | None = None, image_folder: str | None = None) -> list[Source]:
    """The annotation files behind `--data`: JSON/JSONL files as they are, YAML mixtures entry by entry.

    A mixture entry is `{json_path, sampling_strategy}` as in LLaVA-NeXT, optionally with its own `video_folder` /
    `image_folder` (relative paths in a mixture are looked up next to the YAML file first, then from the working
    directory).
    """
    if not data:
        raise DataError("no --data file given")
    folders = {"video_folder": video_folder, "image_folder": image_folder}
    for name, folder in folders.items():
        if folder is not None and not Path(folder).is_dir():
            raise DataError(f"--{name.replace('_', '-')} {folder} is not a folder")
    sources = []
    for item in data:
        path = _existing_file(Path(item), "data file")
        if path.suffix.lower() in DATA_SUFFIXES:
            sources.append(Source(path, "all", *(Path(f) if f else None for f in folders.values())))
        elif path.suffix.lower() in MIXTURE_SUFFIXES:
            sources += _read_mixture(path, folders)
        else:
            raise DataError(f"{path}: unknown data format {path.suffix!r} (give .json, .jsonl or a .yaml mixture)")
    return sources


def _read_mixture(path: Path, folders: dict) -> list[Source]:
    import yaml

    try:
        mixture = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise DataError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason})") from None
    except RecursionError:
        raise DataError(f"{path}: nested too deeply to read") from None
    entries = mixture.get("datasets") if isinstance(mixture, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: a mixture needs a non-empty 'datasets' list of {{json_path, sampling_strategy}}")
    sources = []
    for number, entry in enumerate(entries, 1):
        where = f"{path}: dataset {number}"
        if not isinstance(entry, dict) or not isinstance(entry.get("json_path"), str):
            raise DataError(f"{where} has no json_path")
        unknown = set(entry) - {"json_path", "sampling_strategy", "video_folder", "image_folder"}
        if unknown:
            raise DataError(f"{where}: unknown key(s) {sorted(unknown)}")
        strategy = str(entry.get("sampling_strategy", "all")).strip()
        if not STRATEGY.match(strategy):
            raise DataError(
                f"{where}: sampling_strategy {strategy!r} is not all, first:N, end:N or random:N (N a count or N%)"
            )
        json_path = _existing_file(Path(entry["json_path"]), f"{where}: json_path", base=path.parent)
        if json_path.suffix.lower() not in DATA_SUFFIXES:
            raise DataError(f"{where}: {json_path} is not a .json or .jsonl file")
        entry_folders = {}
        for name, default in folders.items():
            folder = entry.get(name)
            if folder is None:
                entry_folders[name] = Path(default) if default else None
                continue
            folder = Path(folder)
            if not folder.is_absolute() and (path.parent / folder).is_dir():
                folder = path.parent / folder
            if not folder.is_dir():
                raise DataError(f"{where}: {name} {folder} is not a folder")
            entry_folders[name] = folder
        sources.append(Source(json_path, strategy, **entry_folders))
    return sources


def _read_annotations(path: Path) -> list:
    """The records of a .json list or a .jsonl file (one per line); DataError (one line, with the line number) for
    text that is not UTF-8, not JSON, or nested deeper than Python's parser can follow."""
    number = None  # the line of a .jsonl file being read
    try:
        with open(path, encoding="utf-8") as file:
            if path.suffix.lower() != ".jsonl":
                records = json.load(file)
            else:
                records = []
                for number, line in enumerate(file, 1):
                    records += [json.loads(line)] if line.strip() else []
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{number or error.lineno}: not valid JSON ({error.msg})") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason})") from None
    except RecursionError:
        raise DataError(f"{path}{f':{number}' if number else ''}: nested too deeply to read") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of samples, got a JSON {type(records).__name__}")
    return records


def select(count: int, strategy: str, seed: int, name: str = "") -> list[int]:
    """Indices kept by a LLaVA-NeXT `sampling_strategy` out of `count` samples, in file order. `random` is seeded
    (by `seed` and the file's `name`), so every process and every resumed run keeps the same samples."""
    kind, number, percent = STRATEGY.match(strategy).groups()
    if kind == "all" or number is None:
        return list(range(count))
    keep = math.ceil(int(number) * count / 100) if percent else int(number)
    keep = min(keep, count)
    if kind == "first":
        return list(range(keep))
    if kind == "end":
        return list(range(count - keep, count))
    return sorted(random.Random(f"{seed}:{name}").sample(range(count), keep))


# --------------------------------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """A validated sample: chat messages in the processor's format and the paths of its visuals, in order."""

    messages: list[dict]
    kind: str | None  # "video", "image" or None (text only)
    visuals: list[str]
    text_chars: int


def parse_sample(record) -> Sample:
    """Chat messages from a LLaVA sample; ValueError (one line) for what makes it unusable."""
    if not isinstance(record, dict):
        raise ValueError(f"is a JSON {type(record).__name__}, not an object")
    if "video" in record and "image" in record:
        raise ValueError("has both 'video' and 'image'; give one kind of visual per sample")
    kind = "video" if "video" in record else "image" if "image" in record else None
    visuals = record[kind] if kind else []
    visuals = [visuals] if isinstance(visuals, str) else visuals
    if kind and not (isinstance(visuals, list) and visuals and all(isinstance(v, str) and v.strip() for v in visuals)):
        raise ValueError(f"'{kind}' must be a path or a non-empty list of paths")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError("has no 'conversations'")
    messages, placeholders, replies, chars = [], 0, 0, 0
    for number, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            raise ValueError(f"turn {number} is not {{'from': ..., 'value': '...'}}")
        role = ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise ValueError(f"turn {number} is from {turn['from']!r}, not one of {sorted(ROLES)}")
        content = []
        pieces = PLACEHOLDER.split(turn["value"])
        for position, piece in enumerate(pieces):
            if position > 0:
                content.append({"type": kind or "video"})
                placeholders += 1
                piece = piece.removeprefix("\n")  # the chat template writes the newline after a placeholder itself
            if piece:
                content.append({"type": "text", "text": piece})
        if role == "assistant" and turn["value"].strip():
            replies += 1
        chars += len(turn["value"])
        messages.append({"role": role, "content": content})
    if not replies:
        raise ValueError("has no reply (no non-empty 'gpt' turn) to learn from")
    if placeholders != len(visuals):
        given = f"{len(visuals)} {kind}{'s' if len(visuals) != 1 else ''}" if kind else "no video or image"
        raise ValueError(f"has {placeholders} <image>/<video> placeholder(s) but {given}")
    return Sample(messages, kind, [v.strip() for v in visuals], chars)


class PackedRecords:
    """Samples as compact JSON bytes in one numpy buffer plus offsets: reading one decodes it. Millions of Python
    dicts would be copied page by page into every DataLoader worker as reference counts change; this is not."""

    def __init__(self, encoded: list[bytes]):
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(item) for item in encoded], out=self.offsets[1:])
        self.buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> dict:
        return json.loads(self.buffer[self.offsets[index] : self.offsets[index + 1]].tobytes())


@dataclass
class TrainingData:
    """Every selected sample of every source, validated, packed, with what length-aware batching needs."""

    sources: list[Source]
    records: PackedRecords  # each {"r": original record, "s": source index, "i": index in its file}
    kinds: np.ndarray  # index into KINDS per sample
    num_visuals: np.ndarray
    text_chars: np.ndarray
    per_source: list[int] = field(default_factory=list)  # samples kept from each source

    def __len__(self):
        return len(self.records)

    def counts(self) -> dict[str, int]:
        return {str(kind or "text"): int((self.kinds == index).sum()) for index, kind in enumerate(KINDS)}


def load_training_data(sources: list[Source], seed: int = 0) -> TrainingData:
    """Read, select and validate every sample; DataError (one line: the first problem and how many samples have one)
    when any sample is unusable or nothing is left."""
    encoded, kinds, num_visuals, chars, per_source = [], [], [], [], []
    problems, first_problem = 0, None
    for source_index, source in enumerate(sources):
        records = _read_annotations(source.path)
        keep = select(len(records), source.sampling_strategy, seed, str(source.path))
        for index in keep:
            record = records[index]
            try:
                sample = parse_sample(record)
                packed = json.dumps({"r": record, "s": source_index, "i": index}, ensure_ascii=False).encode()
            except (ValueError, RecursionError) as error:
                problems += 1
                if first_problem is None:
                    sample_id = record.get("id") if isinstance(record, dict) else None
                    label = f"sample {index}" + (f" (id {sample_id!r})" if sample_id is not None else "")
                    why = "is nested too deeply to read" if isinstance(error, RecursionError) else error
                    first_problem = f"{source.path}: {label} {why}"
                continue
            encoded.append(packed)
            kinds.append(KINDS.index(sample.kind))
            num_visuals.append(len(sample.visuals))
            chars.append(sample.text_chars + TURN_OVERHEAD_TOKENS * CHARS_PER_TOKEN * len(sample.messages))
        per_source.append(len(keep))
        del records
    if first_problem is not None:
        more = f" (and {problems - 1} more sample(s) with a problem)" if problems > 1 else ""
        raise DataError(first_problem + more)
    if not encoded:
        raise DataError(f"no samples in {', '.join(str(source.path) for source in sources)}")
    return TrainingData(
        sources,
        PackedRecords(encoded),
        np.asarray(kinds, dtype=np.int8),
        np.asarray(num_visuals, dtype=np.int32),
        np.asarray(chars, dtype=np.int64),
        per_source,
    )


def media_path(source: Source, kind: str, path: str) -> Path:
    folder = source.video_folder if kind == "video" else source.image_folder
    path = Path(path)
    return path if path.is_absolute() or folder is None else folder / path


def check_media(data: TrainingData, per_source: int = 32) -> list[str]:
    """Look for the visuals of up to `per_source` samples spread over each source: DataError when most of a source's
    checked files are missing (a wrong --video-folder/--image-folder, archives not unpacked), else warnings for the
    missing ones."""
    warnings = []
    start = 0
    for source, count in zip(data.sources, data.per_source):
        indices = [i for i in range(start, start + count) if data.kinds[i] != 0]
        start += count
        if not indices:
            continue
        checked = indices[:: max(1, len(indices) // per_source)][:per_source]
        missing = []
        for index in checked:
            record = data.records[index]["r"]
            sample = parse_sample(record)
            missing += [p for p in (media_path(source, sample.kind, v) for v in sample.visuals) if not p.exists()]
        total = sum(int(data.num_visuals[i]) for i in checked)
        if missing and 2 * len(missing) > total:
            folder = "--video-folder" if data.kinds[checked[0]] == 1 else "--image-folder"
            found = "none" if len(missing) == total else f"only {total - len(missing)}"
            raise DataError(
                f"{source.path}: {found} of the {total} visual file(s) checked exist(s), e.g. {missing[0]} is "
                f"missing (is {folder} right?)"
            )
        if missing:
            warnings.append(
                f"{source.path}: {len(missing)} of {total} visual file(s) checked are missing, e.g. {missing[0]}; "
                "such samples will be skipped"
            )
    return warnings


# --------------------------------------------------------------------------------------------------------------------
# The dataset: frames decoded lazily
# --------------------------------------------------------------------------------------------------------------------


def _frames_folder(folder: Path, sample_indices_fn) -> np.ndarray:
    """A video given as a folder of frame images (as some LLaVA-Video sources ship): sorted by name, sampled."""
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise BadSample("corrupt", f"{folder} is a folder without frame images")
    from transformers.video_utils import VideoMetadata

    indices = sample_indices_fn(metadata=VideoMetadata(total_num_frames=len(files), fps=None))
    frames = []
    for index in indices:
        with Image.open(files[int(index)]) as image:
            frames.append(np.asarray(image.convert("RGB")))
    if len({frame.shape for frame in frames}) > 1:
        raise BadSample("corrupt", f"{folder} holds frames of different sizes")
    return np.stack(frames)


def count_tokens(tokenizer, text: str, limit: int | None = None) -> int:
    """The number of tokens of `text`, exact when it is at most `limit`; above it, some number above `limit`, found by
    tokenizing ever longer beginnings of the text (4x each time), so that a sample of millions of tokens costs about
    `limit` tokens' work and memory, not its own length's."""
    size = len(text) if limit is None else CHARS_PER_TOKEN * (limit + 1)
    while True:
        count = len(tokenizer(text[:size], add_special_tokens=False)["input_ids"])
        if size >= len(text) or count > limit:
            return count
        size *= 4


class VideoChatDataset(torch.utils.data.Dataset):
    """Samples for `CrossLMMDataCollator`: `{"messages", "videos": [(T, H, W, 3) uint8], "images": [PIL image],
    "skipped": [...]}`, the frames decoded when the sample is read.

    Frames are sampled by the video processor's `sample_frames` (`num_frames` uniformly, or `fps` capped by
    `max_frames`). A sample that cannot be used (missing, corrupt or unreadable media; fewer than `min_frames`
    frames; more than `max_length` tokens) is replaced by a usable sample drawn from the dataset (deterministically,
    see `replacement`) and described in "skipped" (so the count reaches the training process from the DataLoader
    workers).
    """

    def __init__(
        self,
        data: TrainingData,
        processor,
        num_frames: int | None = None,
        fps: float | None = None,
        max_frames: int | None = None,
        min_frames: int = 1,
        max_length: int | None = None,
        max_attempts: int = 50,
    ):
        self.data = data
        self.processor = processor
        self.num_frames, self.fps, self.max_frames = num_frames, fps, max_frames
        self.min_frames, self.max_length = min_frames, max_length
        self.max_attempts = max_attempts
        self.epoch = 0
        self._warned = 0

    def __len__(self):
        return len(self.data)

    def set_epoch(self, epoch: int):
        """Called by accelerate's DataLoader at each epoch; `LengthGroupedSampler` reads it."""
        self.epoch = epoch

    @property
    def frames_per_video(self) -> int:
        """Frames a video gives at most: what length-aware batching counts for it."""
        if self.fps is None:
            return self.num_frames or self.processor.video_processor.num_frames
        return self.max_frames or self.processor.video_processor.max_frames

    def lengths(self) -> np.ndarray:
        """Estimated tokens per sample: visual tokens (frames x tokens per frame; one frame per image) plus text."""
        per_frame = self.processor.tokens_per_frame
        frames = np.where(self.data.kinds == 1, self.frames_per_video, 1) * (self.data.kinds != 0)
        return self.data.text_chars // CHARS_PER_TOKEN + self.data.num_visuals * frames * per_frame

    def _sample_indices(self, metadata, **kwargs):
        return self.processor.video_processor.sample_frames(
            metadata, num_frames=self.num_frames, fps=self.fps, max_frames=self.max_frames
        )

    def _uniform_indices(self, metadata, **kwargs):
        """A folder of frames has no frame rate: `--fps` sampling takes `--max-frames` of them uniformly."""
        return self.processor.video_processor.sample_frames(metadata, num_frames=self.frames_per_video)

    def _video(self, path: Path) -> np.ndarray:
        if not path.exists():
            raise BadSample("missing", f"video file not found: {path}")
        try:
            if path.is_dir():
                frames = _frames_folder(path, self._uniform_indices)
            else:  # resized as decoded: a 4K video is never held, nor sent from a worker, at full size
                resize = self.processor.video_processor.frame_resizer()
                frames, _ = read_video(str(path), self._sample_indices, frame_transform=resize)
        except VIDEO_ERRORS as error:
            raise BadSample("corrupt", f"{path}: {str(error).strip().splitlines()[0]}") from None
        if len(frames) < self.min_frames:
            raise BadSample(
                "too short", f"{path} gives {len(frames)} frame(s), fewer than --min-frames {self.min_frames}"
            )
        return frames

    def _image(self, path: Path):
        from PIL import Image

        if not path.exists():
            raise BadSample("missing", f"image file not found: {path}")
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (OSError, ValueError, EOFError, Image.DecompressionBombError) as error:
            raise BadSample("corrupt", f"{path}: {str(error).strip().splitlines()[0]}") from None

    def load(self, index: int) -> dict:
        """The sample at `index` with its frames; BadSample when it cannot be used. A sample longer than `max_length`
        is refused from its text before any frame is decoded when the text alone is too long, and never tokenized
        whole (see `count_tokens`): cutting it short would cut its visual placeholders or its answer."""
        entry = self.data.records[index]
        source = self.data.sources[entry["s"]]
        sample = parse_sample(entry["r"])
        item = {"messages": sample.messages}
        if self.max_length is not None:
            text_tokens = self.text_token_count(item, limit=self.max_length + len(sample.visuals))
            self._check_length(text_tokens + len(sample.visuals) * (self.processor.tokens_per_frame - 1))  # >= 1 frame
        paths = [media_path(source, sample.kind, visual) for visual in sample.visuals]
        if sample.kind == "video":
            item["videos"] = [self._video(path) for path in paths]
        elif sample.kind == "image":
            item["images"] = [self._image(path) for path in paths]
        if self.max_length is not None:
            self._check_length(text_tokens - len(sample.visuals) + self.visual_token_count(item))
        return item

    def _check_length(self, length: int):
        if length > self.max_length:
            raise BadSample("too long", f"{length} tokens or more, more than --max-length {self.max_length}")

    def text_token_count(self, item: dict, limit: int | None = None) -> int:
        """Tokens of a sample's chat text, each placeholder one token: exact up to `limit`, else a number above it."""
        text = self.processor.apply_chat_template(item["messages"], tokenize=False)
        return count_tokens(self.processor.tokenizer, text, limit)

    def visual_token_count(self, item: dict) -> int:
        frames = sum(len(video) for video in item.get("videos", ())) + len(item.get("images", ()))
        return frames * self.processor.tokens_per_frame

    def token_count(self, item: dict) -> int:
        """Exact length of a loaded sample in the model's sequence: its text tokens, each placeholder expanded."""
        placeholders = len(item.get("videos", ())) + len(item.get("images", ()))
        return self.text_token_count(item) - placeholders + self.visual_token_count(item)

    def describe(self, index: int) -> dict:
        entry = self.data.records[index]
        return {"id": entry["r"].get("id"), "file": str(self.data.sources[entry["s"]].path), "index": entry["i"]}

    def replacement(self, index: int, attempt: int) -> int:
        """The sample tried in place of `index` at the `attempt`-th try: drawn from the whole dataset, seeded by
        both, so that a run of bad samples in a row (a folder of videos that did not unpack) does not exhaust the
        tries, and a resumed run draws the same."""
        return int(np.random.default_rng([index, attempt]).integers(len(self))) if attempt else index

    def __getitem__(self, index: int) -> dict:
        """The sample at `index`, or when it cannot be used a usable one drawn in its place. Only `index` itself
        counts as skipped: a bad sample met while looking for a replacement is counted when its own turn comes."""
        skipped, last = [], None
        for attempt in range(self.max_attempts):
            current = self.replacement(index, attempt)
            try:
                item = self.load(current)
            except BadSample as bad:
                last = bad
                if attempt == 0:
                    entry = {**self.describe(current), "reason": bad.reason, "detail": bad.detail}
                    skipped.append(entry)
                    self._warn(entry)
                continue
            item["skipped"] = skipped
            return item
        raise RuntimeError(
            f"Sample {index} and {self.max_attempts - 1} samples drawn in its place could not be used (the last: "
            f"{last.detail}); most of the data is unusable: check --video-folder / --image-folder and the files."
        )

    def _warn(self, entry: dict):
        self._warned += 1
        if self._warned <= 100:
            logger.warning("Skipping sample %(index)s of %(file)s (id %(id)r), %(reason)s: %(detail)s", entry)
        if self._warned == 100:
            logger.warning("Further skipped samples of this process are counted, not logged one by one.")


# --------------------------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------------------------


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Sample order for one epoch, the same for a given seed and epoch on every process and in every run.

    With `group_by_length`: transformers' `get_length_grouped_indices` on global batches of `batch_size` (the batch of
    all processes together for one micro-step): a seeded permutation cut into megabatches of `megabatch_size` batches
    (transformers' default when None), each sorted by length (visual tokens plus text tokens), so that a batch holds
    samples of similar length and padding stays small; the longest sample comes first, so that a run that does not fit
    in memory fails in its first step, not days later, and only the very last batch may be short. Without it: the
    seeded permutation (`shuffle`) or dataset order.

    The epoch comes from `dataset.epoch` (accelerate's DataLoader sets it through `set_epoch` at each epoch, also for
    a resumed run whose first batches are skipped).
    """

    def __init__(self, dataset, lengths, batch_size, seed=0, group_by_length=True, shuffle=True, megabatch_size=None):
        self.dataset = dataset
        self.lengths = np.asarray(lengths).tolist()
        self.batch_size = max(1, int(batch_size))
        self.seed = int(seed)
        self.group_by_length, self.shuffle = group_by_length, shuffle
        self.megabatch_size = megabatch_size

    def __len__(self):
        return len(self.lengths)

    def set_epoch(self, epoch: int):
        self.dataset.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        count = len(self.lengths)
        if not (self.shuffle or self.group_by_length):
            return list(range(count))
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
        if not self.group_by_length:
            return torch.randperm(count, generator=generator).tolist()
        return get_length_grouped_indices(self.lengths, self.batch_size, self.megabatch_size, generator)

    def __iter__(self):
        return iter(self.order(getattr(self.dataset, "epoch", 0)))

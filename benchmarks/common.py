"""What the benchmarks share: CrossLMM and LLaVA-OneVision built from the same parts, prompts laid out the same way,
and the record (machine, command, date, versions) every result file carries."""

import ctypes
import ctypes.util
import datetime
import gc
import json
import os
import platform
import sys
import time

import torch
import transformers
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

from configuration_crosslmm import CrossLMMConfig
from crosslmm.samples import geometry, llava_onevision_video_tokens
from modeling_crosslmm import CACHE_ARG, CrossLMMForConditionalGeneration  # noqa: F401


# The sizes of crosslmm.samples the benchmarks build: tiny and small on a CPU (small keeps the real frame geometry, so
# that token counts and the ratios between the models are the real ones), CrossLMM-2B's and -7B's shapes on a GPU.
SIZES = ("tiny", "small", "2b", "7b")
# Every LLM's context is long enough for LLaVA-OneVision's 1024-frame prompt (200,769 tokens).
MAX_POSITION_EMBEDDINGS = 262144
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = 3, 4  # inside every size's vocabulary
TEXT_BEFORE, TEXT_AFTER = 16, 48  # 64 text tokens: a system/user preamble before the video, the question after it


def parts(size, llm_layers=None):
    """(vision_config, text_config) dicts of a size, as both models are built from them (`llm_layers`: another
    number of decoder layers, the widths kept)."""
    sizes = geometry(size)
    text = {**sizes["text_config"], "max_position_embeddings": MAX_POSITION_EMBEDDINGS}
    if llm_layers:
        text["num_hidden_layers"] = llm_layers
    return sizes["vision_config"], text


def crosslmm_config(
    size,
    pool_size=3,
    v2v_scope="video",
    attn_implementation="sdpa",
    vision_batch_size=64,
    llm_layers=None,
    cross_attention_mlp=True,
):
    """CrossLMM of a size, a DCAL after every 4th decoder layer, as the paper's models."""
    vision, text = parts(size, llm_layers)
    config = CrossLMMConfig(
        vision_config=vision,
        text_config=text,
        pool_size=pool_size,
        v2v_scope=v2v_scope,
        cross_attention_interval=4,
        cross_attention_mlp=cross_attention_mlp,
        vision_batch_size=vision_batch_size,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
    )
    config._attn_implementation = attn_implementation
    return config


def llava_config(size, attn_implementation="sdpa", llm_layers=None):
    vision, text = parts(size, llm_layers)
    config = LlavaOnevisionConfig(
        vision_config=dict(vision),
        text_config=dict(text),
        image_token_index=IMAGE_TOKEN_ID,
        video_token_index=VIDEO_TOKEN_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=text["tie_word_embeddings"],
    )
    config._attn_implementation = attn_implementation
    return config


def build(config, device="cpu", dtype=torch.float32, seed=0):
    """Random-weight CrossLMM or LLaVA-OneVision (by config type) on `device` ("meta": shapes only), in eval mode."""
    cls = (
        CrossLMMForConditionalGeneration
        if isinstance(config, CrossLMMConfig)
        else LlavaOnevisionForConditionalGeneration
    )
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # made in `dtype` on `device` directly: no float32 copy of a 7B model on the GPU
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(default_dtype)
    return model.eval()


def video_tokens(config, num_frames):
    """Placeholder tokens one video of `num_frames` takes in the LLM input."""
    if isinstance(config, CrossLMMConfig):
        return num_frames * config.tokens_per_frame
    return llava_onevision_video_tokens(num_frames, config.vision_config.image_size // config.vision_config.patch_size)


def frame_size(config):
    """Side of the frames each model takes: the vision tower's size (384 px for so400m/14; its patch convolution
    drops the last 6 px)."""
    return config.image_size if isinstance(config, CrossLMMConfig) else config.vision_config.image_size


def prompt_ids(config, num_frames, seed=0):
    """(1, L) ids: TEXT_BEFORE text tokens, the video's placeholders, TEXT_AFTER text tokens."""
    generator = torch.Generator().manual_seed(seed)
    vocab = config.get_text_config().vocab_size
    text = torch.randint(100, min(1000, vocab), (TEXT_BEFORE + TEXT_AFTER,), generator=generator)
    video = torch.full((video_tokens(config, num_frames),), VIDEO_TOKEN_ID)
    return torch.cat([text[:TEXT_BEFORE], video, text[TEXT_BEFORE:]])[None]


def environment():
    """Where and how a result was measured."""
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],  # other work on the machine while this ran
    }
    if torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name()
        machine["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            machine["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "machine": machine,
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cuda": torch.version.cuda,
        },
    }


def print_table(rows, columns):
    """Rows (dicts) as a markdown table, in the given column order."""
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join(" --- " for _ in columns) + "|")
    for line in cells:
        print("| " + " | ".join(line) + " |")


def _cell(value):
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return "" if value is None else str(value)


def write_json(path, results):
    with open(path, "w") as f:
        json.dump({**environment(), "results": results}, f, indent=2)
    print(f"\nwrote {path}")


# ---- measuring ----------------------------------------------------------------------------------------------------


def timed(fn, device):
    """(seconds, result) of one call; on CUDA the device is synchronised only around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def peak_memory(fn, device):
    """Bytes `fn()` allocates at its peak above what was allocated before it (weights, inputs), in a run of its own.

    CUDA: torch.cuda.max_memory_allocated. CPU: the growth of the resident set's high-water mark (VmHWM, reset through
    /proc/self/clear_refs), after glibc's malloc_trim has handed the pages of freed memory back to the system, so that
    memory the allocator reuses is counted again when touched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    gc.collect()
    ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = _proc_status_bytes("VmRSS")
    fn()
    return _proc_status_bytes("VmHWM") - before


def _proc_status_bytes(field):
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def is_out_of_memory(error):
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def weights_bytes(model):
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def random_video(config, num_frames, device, dtype, seed=0):
    """(1, T, 3, S, S) normalised-looking pixels at the size the model takes."""
    size = frame_size(config)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, num_frames, 3, size, size, generator=generator).to(device, dtype)


def add_model_arguments(parser):
    """The options prefill.py and decode.py share."""
    parser.add_argument("--models", nargs="+", default=["LLaVA-OV", "CrossLMM"], choices=["LLaVA-OV", "CrossLMM"])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's); 1 on a shared box")
    parser.add_argument("--size", default="small", choices=SIZES, help="tiny/small: CPU; 2b/7b: GPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="default: bfloat16 on CUDA, float32 on the CPU",
    )
    parser.add_argument(
        "--attn", default="sdpa", help="attention backend of both models (sdpa, flash_attention_2, ...)"
    )
    parser.add_argument("--pool-size", type=int, default=3)
    parser.add_argument("--v2v-scope", default="video", choices=["video", "frame"])
    parser.add_argument(
        "--vision-batch-size", type=int, default=64, help="CrossLMM: frames the vision tower encodes at once"
    )
    parser.add_argument(
        "--llm-layers", type=int, default=None, help="decoder layers of both LLMs (default: the size's), widths kept"
    )
    parser.add_argument(
        "--no-dcal-mlp",
        action="store_true",
        help="CrossLMM without the DCALs' gated MLP (cross_attention_mlp=False): what that block costs, isolated",
    )


def models_from_arguments(args):
    """(device, dtype, {"LLaVA-OV": model, "CrossLMM": model}) as the options ask, random weights."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    crosslmm = crosslmm_config(
        args.size,
        args.pool_size,
        args.v2v_scope,
        args.attn,
        args.vision_batch_size,
        args.llm_layers,
        cross_attention_mlp=not args.no_dcal_mlp,
    )
    configs = {"LLaVA-OV": llava_config(args.size, args.attn, args.llm_layers), "CrossLMM": crosslmm}
    return device, dtype, {name: build(configs[name], device, dtype) for name in args.models}

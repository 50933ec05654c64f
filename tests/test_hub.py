"""A converted checkpoint through the Hub, offline: pulled (laid out as huggingface_hub's cache lays out a repository)
and pushed (what huggingface_hub would commit, captured at its HfApi level, then pulled back)."""

import json

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, RepoUrl
from transformers import PreTrainedTokenizerFast

from crosslmm.convert.cli import convert, parse_args
from hub_cache import add_to_cache, folder_files
from isolated import run_isolated
from modeling_crosslmm import CrossLMMForConditionalGeneration
from processing_crosslmm import CrossLMMImageProcessor, CrossLMMProcessor
from tiny_sources import llava_onevision_folder
from video_processing_crosslmm import CrossLMMVideoProcessor


REPO = "crosslmm-test/crosslmm-tiny"  # where the tests push
CONVERTED_REPO = "crosslmm-test/crosslmm-converted"  # the converted folder, as if uploaded as it is

# Run in a fresh process that cannot import this repository and starts with an empty HF_MODULES_CACHE: everything
# comes from the cache by repository id, as after `huggingface-cli download`. Each repository id given as an argument
# is pulled and run; what it computed is saved as pulled-<i>.pt.
PULL_AND_RUN = """
import json, os, sys
import numpy as np
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

assert not os.path.exists(os.environ["HF_MODULES_CACHE"])
report = []
for i, repo in enumerate(sys.argv[1:]):
    model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__

    video = np.random.RandomState(0).randint(0, 256, (4, 40, 40, 3), dtype=np.uint8)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe the video."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, videos=[video], return_tensors="pt", num_frames=4)
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    torch.save({"inputs": dict(inputs), "logits": logits}, f"pulled-{i}.pt")

    pipe = pipeline("video-text-to-text", model=repo, trust_remote_code=True)
    answer = pipe(text=prompt, videos=[video], num_frames=4, max_new_tokens=3, do_sample=False, return_full_text=False)
    expected = processor.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    report.append({"pipeline": type(pipe).__name__, "answer": answer[0]["generated_text"], "expected": expected})
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    source = llava_onevision_folder(root / "llava-ov")
    output = root / "crosslmm"
    return convert(parse_args(["--source", str(source), "--output", str(output), "--no-verify", "--pool-size", "2"]))


def capture_commits(monkeypatch) -> list:
    """What huggingface_hub would send: each create_commit's files, read when the commit is made."""
    commits = []

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for operation in operations:
            assert type(operation).__name__ == "CommitOperationAdd", operation
            with operation.as_file() as file:
                files[operation.path_in_repo] = file.read()
        commits.append({"repo_id": repo_id, "files": files, "message": kwargs.get("commit_message")})
        return None

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(HfApi, "preupload_lfs_files", lambda self, *args, **kwargs: None)
    # upload_folder has the server check README.md's metadata first: record what it would send. With hf_xet installed
    # it streams files through its own pipeline; without, it commits through create_commit, captured here.
    monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: False)
    monkeypatch.setattr(HfApi, "_validate_yaml", lambda self, content, **kwargs: commits.append({"readme": content}))
    return commits


@pytest.fixture
def captured_commits(monkeypatch):
    return capture_commits(monkeypatch)


@pytest.fixture(scope="module")
def pushed(converted):
    """The commits of `push_to_hub` of the converted model and of its processor, to REPO."""
    model = CrossLMMForConditionalGeneration.from_pretrained(converted)
    # From its parts: `CrossLMMProcessor.from_pretrained(folder)` reads the folder's config.json through AutoConfig,
    # which wants trust_remote_code and would then write this process's transformers module cache.
    processor = CrossLMMProcessor(
        image_processor=CrossLMMImageProcessor.from_pretrained(converted),
        video_processor=CrossLMMVideoProcessor.from_pretrained(converted),
        tokenizer=PreTrainedTokenizerFast.from_pretrained(converted),
        pool_size=model.config.pool_size,
    )
    with pytest.MonkeyPatch.context() as monkeypatch:
        commits = capture_commits(monkeypatch)
        model.push_to_hub(REPO)
        processor.push_to_hub(REPO)
    return commits


def pushed_files(commits) -> dict[str, bytes]:
    files = {}
    for commit in commits:
        files.update(commit["files"])
    return files


@pytest.fixture(scope="module")
def pulled(converted, pushed, tmp_path_factory):
    """Both repositories laid out in one Hub cache and pulled by id in one fresh process (PULL_AND_RUN): the
    converted folder as CONVERTED_REPO, what the pushes sent as REPO. Returns {repo id: (report, pulled tensors)}."""
    workdir = tmp_path_factory.mktemp("pulled")
    cache = workdir / "hub"
    repos = {CONVERTED_REPO: folder_files(converted), REPO: pushed_files(pushed)}
    for repo_id, files in repos.items():
        add_to_cache(cache, repo_id, files)
    out = run_isolated(PULL_AND_RUN, workdir, extra_env={"HF_HUB_CACHE": str(cache)}, args=list(repos))
    reports = json.loads(out.strip().splitlines()[-1])
    return {
        repo_id: (report, torch.load(workdir / f"pulled-{i}.pt", weights_only=True))
        for i, (repo_id, report) in enumerate(zip(repos, reports))
    }


def check_pulled(pulled_repo, folder):
    """The pulled repository ran the pipeline and the model as the folder's model does."""
    report, tensors = pulled_repo
    assert report["pipeline"] == "CrossLMMVideoTextToTextPipeline"
    assert report["answer"] == report["expected"]
    assert tensors["inputs"]["pixel_values_videos"].shape[:2] == (1, 4)
    model = CrossLMMForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(tensors["logits"], model(**tensors["inputs"]).logits, rtol=0, atol=0)


def test_converted_folder_loads_from_the_hub_cache_by_repo_id(converted, pulled):
    check_pulled(pulled[CONVERTED_REPO], converted)


def test_push_to_hub_of_model_and_processor_sends_what_a_pull_needs(converted, pushed, pulled):
    assert [c["repo_id"] for c in pushed] == [REPO, REPO]
    needed = {
        "config.json", "generation_config.json", "model.safetensors", "configuration_crosslmm.py",
        "modeling_crosslmm.py", "pipeline_crosslmm.py", "processing_crosslmm.py", "video_processing_crosslmm.py",
        "processor_config.json", "video_preprocessor_config.json", "preprocessor_config.json", "tokenizer.json",
        "tokenizer_config.json", "chat_template.jinja",
    }  # fmt: skip
    files = pushed_files(pushed)
    assert needed <= set(files), needed - set(files)
    check_pulled(pulled[REPO], converted)


def test_convert_pulls_a_source_by_hub_id_and_pushes_the_whole_folder(tmp_path, monkeypatch, captured_commits):
    source = llava_onevision_folder(tmp_path / "local-source")
    cache = tmp_path / "hub"
    add_to_cache(cache, "crosslmm-test/llava-ov-tiny", folder_files(source))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    cache_before = sorted(p.relative_to(cache) for p in cache.rglob("*"))

    output = convert(
        parse_args(["--source", "crosslmm-test/llava-ov-tiny", "--output", str(tmp_path / "out"), "--no-verify",
                    "--push-to-hub", REPO])
    )  # fmt: skip
    assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == cache_before  # the cache is only read
    card = ModelCard.load(output / "README.md")
    assert card.data.base_model == ["crosslmm-test/llava-ov-tiny"]
    assert f'from_pretrained("{REPO}"' in card.text
    readme, commit = captured_commits
    assert readme["readme"] == (output / "README.md").read_text()
    assert commit["repo_id"] == REPO and commit["files"] == folder_files(output)

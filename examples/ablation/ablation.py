"""A toy-scale version of the paper's ablations (section 4.3, table 2): does CrossLMM's dual cross-attention learn
what the pooled tokens lose? Every arm trains through the real `crosslmm-train` command and is scored on held-out
clips by `generate`.

    python examples/ablation/ablation.py --output runs/ablation                 # every arm, 2 seeds (~9 min, 2 cores)
    python examples/ablation/ablation.py --output runs/quick --steps 40 --arms dcal no-dcal --seeds 0

The task: clips of 4 frames, 32 x 32 px, whose background colour changes every frame (light or dark for the whole
clip); in one frame two squares side by side, one patch each, in one of 4 pairs of colours that all have the same
mean (red and cyan, green and magenta, blue and yellow, black and white). "What colours are the two squares?" needs
the fine detail; "Is the video bright or dark?" (the control) does not. The model's original tokens are the vision
tower's embeddings (a linear patch embedding plus a position embedding) and a pooled token is their mean over a
window that holds both squares, so the 4 pairs give the same pooled tokens (`absence_check` measures it): an arm
without DCALs cannot do better than chance, an arm with them has to learn to fetch the colours from the original
tokens.

Writes into --output: `data/` (the generated clips, LLaVA-format train.json and test.json), one run folder per arm and
seed (`crosslmm-train`'s output, with `accuracy.json`), `absence.json`, `results.md` (the tables), `results.json` and
`accuracy.png` (held-out accuracy and training loss against steps, per arm)."""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch


FRAMES, SIZE, PATCH = 4, 32, 4  # 32 px frames on the tower's 8 x 8 grid of 4 px patches
# Two squares, one patch each, at patch row 3, columns 3 and 4: inside the one pooling window of pool size 1 and inside
# window (1, 1), rows and columns [2, 6), of pool size 3 (adaptive_avg_pool2d of 8 into 3: [0, 3), [2, 6), [5, 8)), and
# in no other window.
PAIR_AT = 3
# The pairs of colours: every pair sums to (255, 255, 255), so every pair has the same mean, mid-grey.
PAIRS = {
    "red": ((255, 0, 0), (0, 255, 255)),  # and cyan
    "green": ((0, 255, 0), (255, 0, 255)),  # and magenta
    "blue": ((0, 0, 255), (255, 255, 0)),  # and yellow
    "black": ((0, 0, 0), (255, 255, 255)),  # and white
}
ANSWERS = {"red": "red and cyan", "green": "green and magenta", "blue": "blue and yellow", "black": "black and white"}
COLOUR_QUESTION = "What colours are the two squares?"
CONTROL_QUESTION = "Is the video bright or dark?"

# The arms: how the starting checkpoint is built (`crosslmm.samples.build_sample_checkpoint`) and the flags of
# crosslmm-train. Gates "opened" start at 0.5 (tanh 0.46); the paper's start at 0.
ARMS = {
    "dcal": ({"pool_size": 1, "gate_init": 0.5}, []),
    "t2v-only": ({"pool_size": 1, "gate_init": 0.5}, ["--use_v2v", "false"]),
    "v2v-only": ({"pool_size": 1, "gate_init": 0.5}, ["--use_t2v", "false"]),
    "dcal-gates-0": ({"pool_size": 1, "gate_init": 0.0}, []),
    "dcal-pool3": ({"pool_size": 3, "gate_init": 0.5}, []),
    "no-dcal": ({"pool_size": 1, "cross_attention_layers": []}, []),
    "no-dcal-pool3": ({"pool_size": 3, "cross_attention_layers": []}, []),
}
# The tests' tiny model, on 32 px frames (an 8 x 8 patch grid); DCALs after decoder layers 1 and 3. The original
# tokens are the tower's embeddings (hidden state 0: a linear patch embedding plus a position embedding) and pooling is
# a plain average of them: what makes the pair of colours absent from the pooled tokens (see the README).
GEOMETRY = {
    "vision": {"image_size": SIZE},
    "text": {"initializer_range": 0.02},
    "vision_feature_layer": 0,
    "pooling_mode": "average",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder for the data, the runs and the results")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="constant after a 5 %% warmup")
    parser.add_argument(
        "--dcal-lr", type=float, default=1e-2, help="the DCALs' learning rate (crosslmm-train --dcal_lr)"
    )
    parser.add_argument("--eval-every", type=int, default=50, help="score held-out clips every this many steps")
    parser.add_argument("--train-clips", type=int, default=3000, help="clips to train on (each asked both questions)")
    parser.add_argument("--test-clips", type=int, default=160, help="held-out clips (each asked both questions)")
    parser.add_argument("--check-clips", type=int, default=8, help="clips of the absence check (8 variants each)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--evaluate", metavar="RUN", help=argparse.SUPPRESS)  # internal: score one run's checkpoints
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------------------------


def make_background(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """(FRAMES, SIZE, SIZE, 3) uint8 frames, each of its own noisy background colour, light or dark for the whole clip,
    and that brightness ("bright" or "dark")."""
    bright = bool(rng.integers(2))
    low, high = (130, 250) if bright else (5, 125)
    backgrounds = rng.integers(low, high, size=(FRAMES, 1, 1, 3))
    frames = np.clip(backgrounds + rng.integers(-8, 9, size=(FRAMES, SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    return frames, "bright" if bright else "dark"


def paint_pair(frames: np.ndarray, frame: int, pair: str, swap: bool) -> np.ndarray:
    """A copy of `frames` with the squares of PAIRS[pair] side by side in frame `frame` (the second colour on the left
    if `swap`)."""
    frames, colours = frames.copy(), PAIRS[pair][::-1] if swap else PAIRS[pair]
    y = PATCH * PAIR_AT
    for index, colour in enumerate(colours):
        x = PATCH * (PAIR_AT + index)
        frames[frame, y : y + PATCH, x : x + PATCH] = colour
    return frames


def make_clip(rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Frames and their answers: a background (`make_background`) and, in one of the frames, a random pair of colours
    in a random order (`paint_pair`)."""
    frames, brightness = make_background(rng)
    pair = list(PAIRS)[rng.integers(len(PAIRS))]
    frames = paint_pair(frames, int(rng.integers(FRAMES)), pair, bool(rng.integers(2)))
    return frames, {"colour": pair, "brightness": brightness}


def make_data(folder: Path, train_clips: int, test_clips: int, seed: int = 1234):
    """Clips as folders of PNG frames (lossless, a video format crosslmm-train reads), train.json (every clip asked
    both questions) and test.json (held out: other clips, same questions)."""
    from PIL import Image

    if (folder / "test.json").is_file():
        return
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_clips), ("test", test_clips)):
        records = []
        for index in range(count):
            frames, answers = make_clip(rng)
            clip = f"{split}/{index:05d}"
            (folder / clip).mkdir(parents=True, exist_ok=True)
            for t, frame in enumerate(frames):
                Image.fromarray(frame).save(folder / clip / f"{t}.png")
            for kind, question, answer in (
                ("colour", COLOUR_QUESTION, ANSWERS[answers["colour"]]),
                ("control", CONTROL_QUESTION, answers["brightness"]),
            ):
                turns = [{"from": "human", "value": f"<video>\n{question}"}, {"from": "gpt", "value": answer}]
                records.append({"id": f"{clip}-{kind}", "video": clip, "kind": kind, "conversations": turns})
        (folder / f"{split}.json").write_text(json.dumps(records))


def load_clip(folder: Path, clip: str) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(folder / clip / f"{t}.png").convert("RGB")) for t in range(FRAMES)])


def build_checkpoint(folder: Path, arm: str, seed: int) -> Path:
    """The arm's random starting checkpoint (the tests' tiny geometry on 32 px frames), built once."""
    from crosslmm.samples import build_sample_checkpoint

    if not (folder / "config.json").is_file():
        options = {"gate_init": 0.0, **ARMS[arm][0]}
        build_sample_checkpoint(folder, "tiny", seed=seed, **GEOMETRY, **options)
    return folder


# --------------------------------------------------------------------------------------------------------------------
# Training (crosslmm-train) and scoring (generate)
# --------------------------------------------------------------------------------------------------------------------


def one_thread_env() -> dict:
    """The environment of every run: one thread (the machine is shared; a tiny model runs no faster on more), this
    checkout's code first on the path."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": path}


def train_command(checkpoint: Path, data: Path, run: Path, arm: str, seed: int, args) -> list[str]:
    """crosslmm-train's stage 2 (`python -m crosslmm.train`, the console script's code) with the arm's flags; the
    vision tower stays frozen (its embeddings are linear whatever their weights, so that changes nothing in the
    argument; it saves time)."""
    return [
        *(sys.executable, "-m", "crosslmm.train", "--stage", "2"),
        *("--model", str(checkpoint), "--data", str(data / "train.json"), "--video-folder", str(data)),
        *("--output_dir", str(run), "--seed", str(seed), "--max_steps", str(args.steps)),
        *("--per_device_train_batch_size", str(args.batch_size), "--gradient_accumulation_steps", "1"),
        *("--num_frames", str(FRAMES), "--train_vision_tower", "false", "--learning_rate", str(args.learning_rate)),
        *("--dcal_lr", str(args.dcal_lr)),
        *("--lr_scheduler_type", "constant_with_warmup", "--warmup_steps", str(max(1, args.steps // 20))),
        *("--save_steps", str(args.eval_every), "--save_total_limit", "1000", "--save_only_model", "true"),
        *("--logging_steps", str(max(1, args.eval_every // 10)), "--gradient_checkpointing", "false"),
        *("--dataloader_num_workers", "0", "--use_cpu", "--report_to", "none", "--disable_tqdm", "true"),
        *ARMS[arm][1],
    ]


def run_arm(output: Path, arm: str, seed: int, args) -> dict:
    """Train one arm with one seed through crosslmm-train, then score its checkpoints (in another process, one
    thread). Returns what `evaluate` wrote, plus the training time."""
    run = output / f"{arm}-seed{seed}"
    result_file = run / "accuracy.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    checkpoint = build_checkpoint(output / "checkpoints" / f"{arm}-seed{seed}", arm, seed)
    run.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(run / "train.log", "w") as log:
        subprocess.run(
            train_command(checkpoint, output / "data", run, arm, seed, args),
            env=one_thread_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            check=True,
        )
    trained = time.time() - start
    subprocess.run(
        [sys.executable, __file__, "--output", str(output), "--evaluate", str(run)], env=one_thread_env(), check=True
    )
    result = json.loads(result_file.read_text())
    result.update(train_seconds=round(trained), total_seconds=round(time.time() - start))
    result_file.write_text(json.dumps(result, indent=1))
    print(
        f"{arm} seed {seed}: colour {result['colour'][-1]:.0%}, control {result['control'][-1]:.0%} "
        f"({result['total_seconds']} s)",
        flush=True,
    )
    return result


def load(folder: Path, dtype=torch.float32):
    """A checkpoint and its processor, for clips whose every frame is used."""
    from crosslmm.train.command import load_processor
    from modeling_crosslmm import CrossLMMForConditionalGeneration

    model = CrossLMMForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()
    processor = load_processor(str(folder), model.config)
    processor.video_processor.do_sample_frames = False
    return model, processor


def answers(model, processor, frames: list[np.ndarray], question: str, batch_size: int = 50) -> list[str]:
    """Greedy answers of `model` to `question` about each clip, a few tokens each."""

    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    replies = []
    for start in range(0, len(frames), batch_size):
        videos = frames[start : start + batch_size]
        inputs = processor(text=[prompt] * len(videos), videos=videos, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        replies += processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return replies


def evaluate(run: Path, data: Path, start: Path) -> dict:
    """Held-out accuracy of the starting checkpoint `start` (step 0) and every checkpoint of `run` on both questions:
    an answer counts when its first word is the right one. Writes run/accuracy.json."""
    torch.set_num_threads(1)
    records = json.loads((data / "test.json").read_text())
    clips = sorted({record["video"] for record in records})
    truth = {(r["video"], r["kind"]): r["conversations"][1]["value"].split()[0] for r in records}
    frames = [load_clip(data, clip) for clip in clips]
    state = json.loads((run / "trainer_state.json").read_text())
    checkpoints = sorted(run.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    steps = {start: 0, **{folder: int(folder.name.split("-")[1]) for folder in checkpoints}}
    if state["global_step"] not in steps.values():  # --steps not a multiple of --eval-every: the final model too
        steps[run] = state["global_step"]
    result = {"steps": [], "colour": [], "control": []}
    for folder, step in steps.items():
        model, processor = load(folder)
        result["steps"].append(step)
        for kind, question in (("colour", COLOUR_QUESTION), ("control", CONTROL_QUESTION)):
            replies = answers(model, processor, frames, question)
            right = [
                (reply.split() or [""])[0].strip(".,").lower() == truth[clip, kind]
                for clip, reply in zip(clips, replies)
            ]
            result[kind].append(sum(right) / len(right))
    result["loss"] = [(entry["step"], entry["loss"]) for entry in state["log_history"] if "loss" in entry]
    result["config"] = {
        key: json.loads((run / "config.json").read_text())[key]
        for key in ("pool_size", "use_t2v", "use_v2v", "cross_attention_layers")
    }
    (run / "accuracy.json").write_text(json.dumps(result, indent=1))
    return result


# --------------------------------------------------------------------------------------------------------------------
# The absence check: the pair of colours is not in the pooled tokens
# --------------------------------------------------------------------------------------------------------------------


def variants(rng: np.random.Generator) -> list[np.ndarray]:
    """One clip (a background, a frame for the squares) with each of the pairs, in either order: 8 variants."""
    frames, _ = make_background(rng)
    frame = int(rng.integers(FRAMES))
    return [paint_pair(frames, frame, pair, swap) for pair in PAIRS for swap in (False, True)]


def spread(values: torch.Tensor) -> tuple[float, float]:
    """For (clips, variants, ...) values: the largest difference (max abs) between two variants of one clip, and the
    smallest between two different clips (their first variants)."""
    within = (values - values[:, :1]).abs().amax().item()
    between = (values[1:, 0] - values[:-1, 0]).abs().flatten(1).amax(1).min().item()
    return within, between


def visual_tokens(folder: Path, videos: list[np.ndarray], dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The starting model's pooled, projected tokens (what replaces the <video> placeholder) and original tokens (what
    the DCALs attend to) of each video: (videos, frames * pool_size**2, D) and (videos, frames * patches, D_v)."""
    model, processor = load(folder, dtype)
    pixels = processor.video_processor(videos=videos, return_tensors="pt")["pixel_values_videos"]
    with torch.no_grad():
        features = model.model.get_video_features(pixels.to(dtype), return_dict=True)
    original = features.last_hidden_state
    return features.pooler_output, original.reshape(len(videos), -1, original.shape[-1])


def first_token_logits(folder: Path, videos: list[np.ndarray]) -> torch.Tensor:
    """The logits of the first answer token to the colour question, per video: (videos, vocabulary)."""
    model, processor = load(folder)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": COLOUR_QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt] * len(videos), videos=videos, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits[:, -1]


def absence_check(output: Path, clips: int = 8) -> dict:
    """The figures behind the README's argument, on `clips` clips, each with the 4 pairs in either order: how much
    the pooled tokens (pool sizes 1 and 3; float32, and float64 to show the rest is rounding), the original tokens
    and the first-token logits of a model without DCALs differ between the variants of one clip (`within_clip`),
    against how much they differ between two clips (`between_clips`)."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(99)
    videos = [video for _ in range(clips) for video in variants(rng)]
    results = {}
    for pool_size, arm in ((1, "dcal"), (3, "dcal-pool3")):
        folder = build_checkpoint(output / "checkpoints" / f"check-{arm}", arm, 0)
        for dtype in (torch.float32, torch.float64):
            pooled, original = visual_tokens(folder, videos, dtype)
            within, between = spread(pooled.reshape(clips, -1, *pooled.shape[1:]))
            row = results.setdefault(f"pooled, {pool_size**2} per frame", {"between_clips": between})
            row[f"within_clip_{dtype}".replace("torch.", "")] = within
            if pool_size == 1 and dtype == torch.float32:  # the same at pool size 3: the same seed, the same tower
                within, between = spread(original.reshape(clips, -1, *original.shape[1:]))
                name = f"original, {original.shape[1] // FRAMES} per frame"
                results[name] = {"between_clips": between, "within_clip_float32": within}
    logits = first_token_logits(build_checkpoint(output / "checkpoints" / "check-no-dcal", "no-dcal", 0), videos)
    within, between = spread(logits.reshape(clips, -1, logits.shape[-1]))
    results["first-token logits, no DCALs"] = {"between_clips": between, "within_clip_float32": within}
    (output / "absence.json").write_text(json.dumps(results, indent=1))
    return results


# --------------------------------------------------------------------------------------------------------------------
# The table and the plot
# --------------------------------------------------------------------------------------------------------------------


def write_results(output: Path, results: dict, absence: dict, args, seconds: float):
    """results.md (a table: final held-out accuracy per arm and seed), results.json and accuracy.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        f"Held-out accuracy after {args.steps} steps of {args.batch_size} ({len(args.seeds)} seed(s); "
        f"{args.test_clips} held-out clips; chance 25 % for the colour, 50 % for the control). "
        f"Whole run: {seconds / 60:.1f} min.",
        "",
        "| arm | pool | T2V | V2V | gates | colour (per seed) | colour (mean) | control (mean) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in args.arms:
        runs = [results[arm, seed] for seed in args.seeds]
        config = runs[0]["config"]
        has_dcals = config["cross_attention_layers"] != []
        colour = [run["colour"][-1] for run in runs]
        lines.append(
            f"| {arm} | {config['pool_size']} | {'on' if has_dcals and config['use_t2v'] else '-'} | "
            f"{'on' if has_dcals and config['use_v2v'] else '-'} | "
            f"{ARMS[arm][0].get('gate_init', '-') if has_dcals else '-'} | "
            f"{' / '.join(f'{value:.0%}' for value in colour)} | {np.mean(colour):.0%} | "
            f"{np.mean([run['control'][-1] for run in runs]):.0%} |"
        )
    lines += [
        "",
        "Absence check: largest difference (max abs) between the 8 variants of one clip (4 pairs, 2 orders), against "
        f"the smallest between two clips ({args.check_clips} clips; `absence.json`):",
        "",
        "| values | within a clip, float32 | within a clip, float64 | between clips |",
        "|---|---|---|---|",
    ]
    for name, row in absence.items():
        cells = [f"{row[key]:.1e}" if key in row else "-" for key in ("within_clip_float32", "within_clip_float64")]
        lines.append(f"| {name} | {' | '.join(cells)} | {row['between_clips']:.1e} |")
    (output / "results.md").write_text("\n".join(lines) + "\n")
    (output / "results.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "seconds": round(seconds),
                "absence": absence,
                "runs": {f"{arm}-seed{seed}": run for (arm, seed), run in results.items()},
            },
            indent=1,
        )
    )

    figure, (accuracy, loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    for index, arm in enumerate(args.arms):
        colour = f"C{index}"
        for number, seed in enumerate(args.seeds):
            run = results[arm, seed]
            accuracy.plot(
                run["steps"],
                [100 * value for value in run["colour"]],
                color=colour,
                marker="o",
                markersize=3,
                linestyle=("-", "--", ":", "-.")[number % 4],
                label=arm if number == 0 else None,
            )
            steps, values = zip(*run["loss"]) if run["loss"] else ((), ())
            loss.plot(
                steps,
                values,
                color=colour,
                linewidth=1,
                linestyle=("-", "--", ":", "-.")[number % 4],
                label=arm if number == 0 else None,
            )
    accuracy.axhline(25, color="grey", linewidth=0.8, linestyle=":")
    accuracy.text(0, 26, "chance", color="grey", fontsize=8)
    accuracy.set(
        xlabel="training step",
        ylabel="held-out accuracy (%)",
        ylim=(0, 102),
        title=f'"{COLOUR_QUESTION}" (seeds: solid, dashed)',
    )
    loss.set(xlabel="training step", ylabel="training loss (both questions)", yscale="log", title="training loss")
    accuracy.legend(fontsize=8)
    loss.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(output / "accuracy.png", dpi=110)
    plt.close(figure)


def main(argv=None):
    from transformers.utils import logging as transformers_logging

    args = parse_args(argv)
    output = Path(args.output)
    transformers_logging.disable_progress_bar()
    if args.evaluate:
        run = Path(args.evaluate)
        evaluate(run, output / "data", output / "checkpoints" / run.name)
        return 0
    started = time.time()
    make_data(output / "data", args.train_clips, args.test_clips)
    print(f"Data: {args.train_clips} training and {args.test_clips} held-out clips in {output / 'data'}", flush=True)
    absence = absence_check(output, args.check_clips)
    print(f"Absence check: {json.dumps(absence)}", flush=True)
    jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]
    for arm, seed in jobs:  # here, before the threads: imports in several threads at once can fail
        build_checkpoint(output / "checkpoints" / f"{arm}-seed{seed}", arm, seed)
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {job: pool.submit(run_arm, output, *job, args) for job in jobs}
        results = {job: future.result() for job, future in futures.items()}
    write_results(output, results, absence, args, time.time() - started)
    print((output / "results.md").read_text())
    print(f"Wrote {output / 'results.md'} and {output / 'accuracy.png'} in {(time.time() - started) / 60:.1f} min.")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())

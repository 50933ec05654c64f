"""A toy-scale version of the paper's ablations (section 4.3, table 2): does CrossLMM's dual cross-attention learn
what the pooled tokens lose? Every arm trains through the real `crosslmm-train` command and is scored on held-out
clips by `generate`.

    python examples/ablation/ablation.py --output runs/ablation                 # every arm, 2 seeds (~15 min, 2 cores)
    python examples/ablation/ablation.py --output runs/quick --steps 40 --arms dcal no-dcal --seeds 0

The task: clips of 4 frames, 32 x 32 px, whose background colour changes every frame (light or dark for the whole
clip); in one frame a 5 x 5 px square of one of 4 colours. "What colour is the small square?" needs the fine detail;
"Is the video bright or dark?" (the control) does not. With pool_size 1 the LLM sees one pooled token per frame, the
average of the frozen vision tower's 64 patch tokens, from which the square's colour cannot be read (`probe`: about
chance on the pooled tokens, far above it on the original ones): an arm without DCALs can only guess, an arm with them
has to learn to fetch the colour from the original tokens.

Writes into --output: `data/` (the generated clips, LLaVA-format train.json and test.json), one run folder per arm and
seed (`crosslmm-train`'s output, with `accuracy.json`), `probe.json`, `results.md` (the table), `results.json` and
`accuracy.png` (held-out accuracy and training loss against steps, per arm).
"""

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


FRAMES, SIZE, SQUARE = 4, 32, 4  # the square fills one 4 x 4 px patch of the tower
COLOURS = {"red": (230, 30, 30), "green": (30, 200, 50), "blue": (30, 60, 230), "purple": (150, 30, 170)}
COLOUR_QUESTION = "What colour is the small square?"
CONTROL_QUESTION = "Is the video bright or dark?"

# The arms: how the starting checkpoint is built (`crosslmm.samples.build_sample_checkpoint`) and the flags of
# crosslmm-train. Gates "opened" start at 0.5 (tanh 0.46); the paper's start at 0.
ARMS = {
    "dcal": ({"pool_size": 1, "gate_init": 0.5}, []),
    "t2v-only": ({"pool_size": 1, "gate_init": 0.5}, ["--use_v2v", "false"]),
    "v2v-only": ({"pool_size": 1, "gate_init": 0.5}, ["--use_t2v", "false"]),
    "dcal-gates-0": ({"pool_size": 1, "gate_init": 0.0}, []),
    "no-dcal": ({"pool_size": 1, "cross_attention_layers": []}, []),
    "no-dcal-pool3": ({"pool_size": 3, "cross_attention_layers": []}, []),
    "dcal-pool3": ({"pool_size": 3, "gate_init": 0.5}, []),
}
DEFAULT_ARMS = [arm for arm in ARMS if arm != "dcal-pool3"]  # all 7 take longer than 15 minutes on 2 cores
# The tests' tiny model, on 32 px frames (an 8 x 8 patch grid); DCALs after decoder layers 1 and 3; average pooling,
# so that a pooled token is the mean of its patch tokens.
GEOMETRY = {"vision": {"image_size": SIZE}, "text": {"initializer_range": 0.02}, "pooling_mode": "average"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder for the data, the runs and the results")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=DEFAULT_ARMS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="constant after a 5 %% warmup")
    parser.add_argument(
        "--dcal-lr", type=float, default=1e-2, help="the DCALs' learning rate (crosslmm-train --dcal_lr)"
    )
    parser.add_argument("--eval-every", type=int, default=100, help="score held-out clips every this many steps")
    parser.add_argument("--train-clips", type=int, default=3000, help="clips to train on (each asked both questions)")
    parser.add_argument("--test-clips", type=int, default=160, help="held-out clips (each asked both questions)")
    parser.add_argument("--probe-clips", type=int, default=1200, help="clips for the probe (3/4 train, 1/4 test)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--evaluate", metavar="RUN", help=argparse.SUPPRESS)  # internal: score one run's checkpoints
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------------------------


def make_clip(rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """(FRAMES, SIZE, SIZE, 3) uint8 frames and their answers. Every frame has its own background colour (noisy, light
    or dark for the whole clip); one frame holds a SQUARE x SQUARE square of one of COLOURS, anywhere."""
    bright = bool(rng.integers(2))
    low, high = (130, 250) if bright else (5, 125)
    backgrounds = rng.integers(low, high, size=(FRAMES, 1, 1, 3))
    frames = np.clip(backgrounds + rng.integers(-8, 9, size=(FRAMES, SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    frame, y, x = rng.integers(FRAMES), *(SQUARE * rng.integers(SIZE // SQUARE, size=2))
    frames[frame, y : y + SQUARE, x : x + SQUARE] = COLOURS[colour]
    return frames, {"colour": colour, "brightness": "bright" if bright else "dark"}


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
                ("colour", COLOUR_QUESTION, answers["colour"]),
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
        build_sample_checkpoint(
            folder,
            "tiny",
            seed=seed,
            text=GEOMETRY["text"],
            vision=GEOMETRY["vision"],
            pooling_mode=GEOMETRY["pooling_mode"],
            **options,
        )
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
    vision tower stays frozen, so that what a pooled token holds is what the probe measured."""
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

    from crosslmm.train.command import load_processor
    from modeling_crosslmm import CrossLMMForConditionalGeneration

    torch.set_num_threads(1)
    records = json.loads((data / "test.json").read_text())
    clips = sorted({record["video"] for record in records})
    truth = {(r["video"], r["kind"]): r["conversations"][1]["value"] for r in records}
    frames = [load_clip(data, clip) for clip in clips]
    state = json.loads((run / "trainer_state.json").read_text())
    checkpoints = sorted(run.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    steps = {start: 0, **{folder: int(folder.name.split("-")[1]) for folder in checkpoints}}
    if state["global_step"] not in steps.values():  # --steps not a multiple of --eval-every: the final model too
        steps[run] = state["global_step"]
    result = {"steps": [], "colour": [], "control": []}
    for folder, step in steps.items():
        model = CrossLMMForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
        processor = load_processor(str(folder), model.config)
        processor.video_processor.do_sample_frames = False
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
# The probe: is the square's colour in the pooled tokens?
# --------------------------------------------------------------------------------------------------------------------


class AttentionProbe(torch.nn.Module):
    """A score of each colour for every token (linear, or an MLP with `hidden`), soft-maxed over the tokens
    (logsumexp): what one attending query can read from the tokens, wherever the square is."""

    def __init__(self, width: int, hidden: int = 0):
        super().__init__()
        layers = [torch.nn.Linear(width, hidden), torch.nn.GELU()] if hidden else []
        self.scores = torch.nn.Sequential(*layers, torch.nn.Linear(hidden or width, len(COLOURS)))

    def forward(self, tokens):  # (clips, tokens, width) -> (clips, colours)
        return self.scores(tokens).logsumexp(1)


def fit_probe(train_x, train_y, test_x, test_y, hidden: int = 0, steps: int = 300) -> float:
    """Held-out accuracy of an `AttentionProbe` of the colour on (clips, tokens, width) features, standardised on the
    training set."""
    torch.manual_seed(0)
    mean, std = train_x.mean((0, 1)), train_x.std((0, 1)) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    probe = AttentionProbe(train_x.shape[-1], hidden)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(probe(train_x), train_y).backward()
        optimizer.step()
    with torch.no_grad():
        return (probe(test_x).argmax(-1) == test_y).float().mean().item()


def probe(output: Path, train_clips: int = 1500, test_clips: int = 500) -> dict:
    """Probes of the square's colour on the features the LLM gets from the vision tower (frozen in every arm) of the
    starting model at pool sizes 1 and 3: the pooled, projected tokens (what replaces the <video> placeholder; the
    projector trains, but acts on each pooled token alone, so it cannot add what pooling removed) and the original
    tokens (what the DCALs attend to). Fresh clips of the task; chance is 25 %."""
    from crosslmm.train.command import load_processor
    from modeling_crosslmm import CrossLMMForConditionalGeneration

    torch.set_num_threads(1)
    rng = np.random.default_rng(99)
    clips = [make_clip(rng) for _ in range(train_clips + test_clips)]
    labels = torch.tensor([list(COLOURS).index(answers["colour"]) for _, answers in clips])
    results = {}
    for pool_size, arm in ((1, "dcal"), (3, "dcal-pool3")):
        folder = build_checkpoint(output / "checkpoints" / f"probe-pool{pool_size}", arm, 0)
        model = CrossLMMForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
        processor = load_processor(str(folder), model.config).video_processor
        pooled, original = [], []
        for start in range(0, len(clips), 100):
            videos = [frames for frames, _ in clips[start : start + 100]]
            pixels = processor(videos=videos, do_sample_frames=False, return_tensors="pt")["pixel_values_videos"]
            with torch.no_grad():
                features = model.model.get_video_features(pixels, return_dict=True)
            pooled.append(features.pooler_output)  # (clips, frames * pool_size**2, D)
            tokens = features.last_hidden_state
            original.append(tokens.reshape(len(videos), -1, tokens.shape[-1]))  # (clips, frames * patches, D_v)
        pooled, original = torch.cat(pooled), torch.cat(original)
        train, test = slice(0, train_clips), slice(train_clips, None)
        results[f"pool{pool_size}"] = {
            "pooled_tokens_per_frame": pool_size**2,
            "pooled_linear": fit_probe(pooled[train], labels[train], pooled[test], labels[test]),
            "pooled_mlp": fit_probe(pooled[train], labels[train], pooled[test], labels[test], hidden=128),
        }
        if pool_size == 1:  # the same seed gives both models the same vision tower: its original tokens once
            results["original"] = {
                "original_tokens_per_frame": original.shape[1] // FRAMES,
                "original_linear": fit_probe(original[train], labels[train], original[test], labels[test]),
                "original_mlp": fit_probe(original[train], labels[train], original[test], labels[test], hidden=128),
            }
    (output / "probe.json").write_text(json.dumps(results, indent=1))
    return results


# --------------------------------------------------------------------------------------------------------------------
# The table and the plot
# --------------------------------------------------------------------------------------------------------------------


def write_results(output: Path, results: dict, probes: dict, args, seconds: float):
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
        "Probe of the square's colour from the starting model's tokens (held-out accuracy of a score per token, "
        "soft-maxed over the tokens; chance 25 %):",
        "",
        "| tokens | linear | MLP |",
        "|---|---|---|",
    ]
    for name, result in probes.items():
        kind = "original" if name == "original" else "pooled"
        lines.append(
            f"| {kind}, {result[f'{kind}_tokens_per_frame']} per frame | "
            f"{result[f'{kind}_linear']:.0%} | {result[f'{kind}_mlp']:.0%} |"
        )
    (output / "results.md").write_text("\n".join(lines) + "\n")
    (output / "results.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "seconds": round(seconds),
                "probe": probes,
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
        title='"What colour is the small square?" (seeds: solid, dashed)',
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
    probes = probe(output, args.probe_clips * 3 // 4, args.probe_clips - args.probe_clips * 3 // 4)
    print(f"Probe: {json.dumps(probes)}", flush=True)
    jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]
    for arm, seed in jobs:  # here, before the threads: imports in several threads at once can fail
        build_checkpoint(output / "checkpoints" / f"{arm}-seed{seed}", arm, seed)
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {job: pool.submit(run_arm, output, *job, args) for job in jobs}
        results = {job: future.result() for job, future in futures.items()}
    write_results(output, results, probes, args, time.time() - started)
    print((output / "results.md").read_text())
    print(f"Wrote {output / 'results.md'} and {output / 'accuracy.png'} in {(time.time() - started) / 60:.1f} min.")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())

"""A conversation about one video: the first question against a follow-up that reuses the first turn's cache (the
DCALs' visual memory and the self-attention cache), and against the same follow-up asked from scratch (the whole
conversation again, frames included). CrossLMM only, random weights; greedy `generate`, `--new-tokens` per answer
(the answers are forced to that length, so that the turns compare).

    python benchmarks/conversation.py --size small --frames 64 --threads 1 [--json PATH]
"""

import argparse
import statistics

import torch

from common import (
    CACHE_ARG,
    TEXT_AFTER,
    build,
    crosslmm_config,
    print_table,
    prompt_ids,
    random_video,
    timed,
    write_json,
)


def follow_up_ids(first_sequences, question_tokens, vocab):
    """The conversation so far and the next question's tokens (random ids standing for a ChatML user turn)."""
    generator = torch.Generator().manual_seed(1)
    question = torch.randint(100, min(1000, vocab), (1, question_tokens), generator=generator)
    question = question.to(first_sequences.device)
    return torch.cat([first_sequences, question], dim=1)


@torch.no_grad()
def run(model, num_frames, device, dtype, new_tokens, repeats):
    ids = prompt_ids(model.config, num_frames).to(device)
    video = random_video(model.config, num_frames, device, dtype)
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    def first_turn():
        return model.generate(input_ids=ids, pixel_values_videos=video, return_dict_in_generate=True, **settings)

    first_turn()  # warm-up
    first_times, follow_times, scratch_times = [], [], []
    for _ in range(repeats):
        seconds, first = timed(first_turn, device)
        first_times.append(seconds)
        conversation = follow_up_ids(first.sequences, TEXT_AFTER, model.config.text_config.vocab_size)
        cache = getattr(first, CACHE_ARG)
        seconds, follow_up = timed(
            lambda: model.generate(input_ids=conversation, **{CACHE_ARG: cache}, **settings), device
        )
        follow_times.append(seconds)
        seconds, scratch = timed(
            lambda: model.generate(input_ids=conversation, pixel_values_videos=video, **settings), device
        )
        scratch_times.append(seconds)
        assert torch.equal(follow_up, scratch), "the follow-up answered otherwise than the conversation from scratch"
    first_s, follow_s, scratch_s = (statistics.median(t) for t in (first_times, follow_times, scratch_times))
    return {
        "frames": num_frames,
        "prompt_tokens": ids.shape[1],
        "follow_up_tokens": conversation.shape[1],
        "first_turn_s": first_s,
        "follow_up_s": follow_s,
        "from_scratch_s": scratch_s,
        "speed-up": scratch_s / follow_s,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", choices=["tiny", "small", "2b", "7b"])
    parser.add_argument("--frames", nargs="+", type=int, default=[64])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(crosslmm_config(args.size), device, dtype)
    results = [run(model, frames, device, dtype, args.new_tokens, args.repeats) for frames in args.frames]
    print(f"CrossLMM {args.size}, {args.new_tokens} new tokens per answer, median of {args.repeats}\n")
    columns = ["frames", "prompt_tokens", "follow_up_tokens", "first_turn_s", "follow_up_s", "from_scratch_s"]
    print_table(results, [*columns, "speed-up"])
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()

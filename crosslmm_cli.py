"""`crosslmm-answer`: ask a CrossLMM checkpoint a question about a video, from the command line.

With no arguments it builds (once, into a cache folder) a small random-weight CrossLMM with a real byte-level BPE
tokenizer trained here, plus a sample video it encodes itself, and runs the whole path: decode frames, encode them,
prefill, generate. The building blocks (`build_tokenizer`, `build_sample_checkpoint`, `build_sample_video`) are also
what the tests use to get a realistic checkpoint without downloading anything.
"""

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_PRETOKENIZE_REGEX


ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, IMAGE_TOKEN, VIDEO_TOKEN]
TOKENIZER_VOCAB_SIZE = 768

# A short English corpus about videos and questions, enough for a few hundred BPE merges of everyday words.
SAMPLE_CORPUS = """\
You are a helpful assistant. Describe the video in detail. What happens in this video?
A red circle moves from the left of the frame to the right while a blue square rises from the bottom.
A green triangle spins slowly in the middle of the picture. The background is dark and the shapes are bright.
How many objects can you see? There are three objects: a circle, a square and a triangle.
What colour is the shape that moves fastest? The red circle moves fastest; it crosses the whole frame in two seconds.
Where is the blue square at the end of the video? At the end it is near the top of the frame.
The camera does not move. The light does not change. Nothing else appears in the scene.
A person walks into the room, sits down at a table, opens a book and starts to read.
A dog runs across the garden, jumps over a small fence and catches a ball in the air.
Two people talk in a kitchen while one of them cooks dinner and the other sets the table.
A car drives along a road by the sea at sunset; the sky turns orange, then purple, then dark.
Summarize the main events of the video in one sentence. Answer the question with a short phrase.
Is there any text on the screen? Which object appears first, and which one appears last?
Why does the man stop walking? Because the light turns red and he waits to cross the street.
What is the woman holding in her hand? She is holding a cup of coffee and a phone.
The children are playing football on the grass, and their parents are watching them from a bench.
First the water boils, then the cook adds the pasta, and after ten minutes the dinner is ready.
The video shows a long journey through the mountains, with snow, rivers, forests and small villages.
Please answer yes or no. Yes. No. I am not sure. It looks like a cat, but it could be a small dog.
One, two, three, four, five, six, seven, eight, nine, ten. 0 1 2 3 4 5 6 7 8 9 10 100 2024 12:30
"""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A small Qwen2-style byte-level BPE tokenizer, trained here on `SAMPLE_CORPUS` (deterministic, no download).

    It has the Qwen2 ChatML special tokens (`<|endoftext|>` is padding and end of sequence, `<|im_start|>`,
    `<|im_end|>`) and the `<image>`/`<video>` placeholders as added special tokens, so prompts, chat templates and
    placeholder expansion behave as with the real Qwen2.5 tokenizer, only with a vocabulary of a few hundred tokens.
    """
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SAMPLE_CORPUS.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END, IMAGE_TOKEN, VIDEO_TOKEN],
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )

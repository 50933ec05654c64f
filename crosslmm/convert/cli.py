"""Build a CrossLMM checkpoint folder from checkpoints that exist, ready for `from_pretrained` and the Hub.

    crosslmm-convert --source llava-hf/llava-onevision-qwen2-0.5b-ov-hf --output crosslmm-0.5b
    crosslmm-convert --vision google/siglip2-so400m-patch14-384 --text Qwen/Qwen2.5-1.5B-Instruct \\
        --output crosslmm-2b
    crosslmm-convert --source path/to/llava-next-crosslmm-run --output crosslmm-trained

(`python convert_checkpoint.py ...` in a checkout runs the same command.)

Sources (local folders or Hub ids; Hub files come through huggingface_hub and its cache):

1. LLaVA-OneVision (the same SigLIP + 2-layer MLP projector + Qwen2 stack), in the transformers format
   (`LlavaOnevisionForConditionalGeneration`) or in the original LLaVA-NeXT format (`LlavaQwenForCausalLM`:
   `model.vision_tower.vision_tower.vision_model.*`, `model.mm_projector.0/2`, `model.layers.*`, `lm_head`).
   The vision tower, projector and LLM are carried over; the DCALs are new, with gates at 0 (`--gate-init`), norms at
   1, random cross-attention projections and (by default) a copy of the preceding decoder layer's MLP.
2. A SigLIP/SigLIP2 vision checkpoint plus a Qwen2.5 LLM checkpoint (`--vision`, `--text`). The tower is cut as
   LLaVA-OneVision cuts it (its last encoder layer and the attention-pooling head dropped, so that the original visual
   tokens are the penultimate layer's output); the projector is random.
3. A CrossLMM trained in the LLaVA-NeXT code base (a LLaVA-NeXT checkpoint whose keys also hold DCALs), with the DCAL
   names of `crosslmm.convert.sources.LLAVA_NEXT_DCAL_KEY_MAP` (`model.cross_attn_layers.N.{v2v,t2v}_cross_attn`,
   `ffn`, ...), or those of a `--key-map` JSON file.

Every source tensor is either placed, or dropped on purpose with a reason that the run prints; any other tensor, any
CrossLMM tensor left without a source and any shape mismatch fails the run, naming each key. Tensors stream from the
source shards to the output shards (peak memory about one output shard). The folder is written next to `--output`
under a temporary name and renamed at the end, so a failed or interrupted run (SIGINT, SIGTERM, SIGHUP) leaves
nothing behind. The rename never replaces a folder with files in it that appeared at `--output` meanwhile (another
conversion, say); with `--overwrite` the old folder is moved aside and deleted only once the new one is in place.

Exit status: 0 on success, 1 with one error line on bad input, 128 + the signal's number when interrupted.
"""

import argparse
import contextlib
import errno
import os
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from pathlib import Path

import torch

from crosslmm import log_to_stderr
from crosslmm.convert import DTYPES, ConversionError, logger
from crosslmm.convert.plan import build_config, expected_tensors, plan_conversion, report_plan
from crosslmm.convert.sources import load_source, load_tokenizer, resolve, source_dtype
from crosslmm.convert.verify import VERIFY_MAX_PARAMETERS, run_verification
from crosslmm.convert.write import (
    push_folder,
    set_permissions,
    write_code,
    write_generation_config,
    write_model_card,
    write_processor,
    write_weights,
)


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP, raised where the run is so that its temporary folder is removed on the way out. A
    BaseException, so that no `except Exception` on the way turns it into a conversion error."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_signals_received: list[int] = []
_holding = False


def _on_signal(signum, frame):
    """Raise `Interrupted` at the first signal only: a second one must not cut the clean-up short. The signal is
    also noted, because an exception raised inside a C extension's call back into Python can come out of it as
    another exception (safetensors turns it into a ValueError)."""
    _signals_received.append(signum)
    if len(_signals_received) == 1 and not _holding:
        raise Interrupted(signum)


def _raise_if_signalled():
    """Raise the signal that came earlier, if one did. Its `Interrupted` can have been lost on the way: raised inside a
    finalizer (a progress bar's `__del__`), which Python reports and ignores, so the run went on; it must not go on to
    put its folder in place."""
    if _signals_received:
        raise Interrupted(_signals_received[0])


def _ignore_lost_interruptions(unraisable):
    """`sys.unraisablehook` while converting: an `Interrupted` raised inside a finalizer is not reported (the run
    raises it again, `_raise_if_signalled`), anything else as Python would."""
    if not isinstance(unraisable.exc_value, Interrupted):
        sys.__unraisablehook__(unraisable)


@contextlib.contextmanager
def _signals_held():
    """A signal that arrives inside the block takes effect at its end, so that the few steps that must not be cut
    in half (creating the temporary folder and naming it, swapping it into place, removing it) never are."""
    global _holding
    earlier = len(_signals_received)
    _holding = True
    try:
        yield
    finally:
        _holding = False
    if not earlier and _signals_received:
        raise Interrupted(_signals_received[0])


class _LineTrackingStream:
    """stderr, remembering whether what was last written to it ended a line, so that the error line of an interrupted
    run starts a line of its own whatever a progress bar had written when the signal came. It is marked as mid-line
    before each write, so a signal inside `write` can cost an empty line, never a shared one. An empty write changes
    nothing (a progress bar's `close` starts with one, and a signal can come right after it)."""

    def __init__(self, stream):
        self.stream = stream
        self.at_line_start = True

    def write(self, text: str) -> int:
        ends_line = text.endswith("\n") if text else self.at_line_start
        self.at_line_start = False
        written = self.stream.write(text)
        self.at_line_start = ends_line
        return written

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _exit_now(status: int):
    """End the process without the interpreter's shutdown, once the temporary folder is gone: the signal may have cut
    an object off halfway through its construction (a progress bar between two attributes), and its finalizer would
    print a traceback after our one line."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _check_output(output: Path, args):
    """Before anything is read: the output is a folder we may create or (with --overwrite) replace, next to which we
    can write, and no source lies inside it."""
    if output.exists() and not output.is_dir():
        raise ConversionError(f"--output {output} is a file, not a folder; nothing was written.")
    if output.exists() and not args.overwrite:
        raise ConversionError(f"{output} exists; pass --overwrite to replace it.")
    for option in ("source", "vision", "text", "tokenizer", "key_map"):
        given = getattr(args, option, None)
        path = Path(given).expanduser() if given else None
        if path is not None and path.exists() and (path.resolve() == output or output in path.resolve().parents):
            raise ConversionError(
                f"--{option.replace('_', '-')} {given} lies inside --output {output}: the conversion would replace "
                "it. Choose another --output."
            )
    ancestor = output.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConversionError(f"Cannot create {output}: {ancestor} is a file, not a folder.")
    try:  # the one sure test of writing there: what the run itself does at the end
        with _signals_held():
            os.rmdir(tempfile.mkdtemp(prefix=f".{output.name}.probe-", dir=ancestor))
    except OSError as error:
        raise ConversionError(f"Cannot create {output}: {ancestor} is not writable ({error.strerror}).") from None


def rename_no_replace(source: Path, target: Path):
    """Rename the folder `source` to `target` unless something that holds data is there: rename(2) itself refuses a
    file or a non-empty folder at `target`, atomically (an empty folder, which holds nothing, is replaced). Raises
    FileExistsError naming `target` when it refuses."""
    try:
        os.rename(source, target)
    except OSError as error:
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(error.errno, os.strerror(error.errno), str(target)) from None
        raise


def _create_temporary_folder(output: Path) -> Path:
    """The folder the conversion is written into, next to `output` so that the final rename stays on one file
    system."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{output.name}.converting-", dir=output.parent))
    except OSError as error:
        raise ConversionError(f"Cannot create {output}: {error}") from None


def _move_into_place(temporary: Path, output: Path, overwrite: bool):
    """The finished folder becomes `output`. What is at `output` now is checked again (a folder may have appeared
    since the start): without --overwrite it is left alone and the run fails; with --overwrite it is moved aside,
    the new folder renamed into place, and the old one deleted only then (put back if the rename fails)."""
    appeared = (
        f"{output} appeared while converting (another conversion into the same folder?); it was left as it is and "
        "nothing was written. Pass --overwrite to replace it."
    )
    aside = None
    if os.path.lexists(output):
        if not overwrite:
            raise ConversionError(appeared)
        if not output.is_dir():
            raise ConversionError(f"--output {output} became a file while converting; nothing was written.")
        aside = output.parent / f".{output.name}.replaced-{uuid.uuid4().hex[:8]}"
        os.rename(output, aside)
    try:
        rename_no_replace(temporary, output)
    except FileExistsError:
        if aside is not None:
            raise ConversionError(
                f"{output} was re-created while being replaced; the previous folder is kept at {aside}."
            )
        raise ConversionError(appeared) from None
    except BaseException:
        if aside is not None:
            try:
                os.rename(aside, output)  # put back
            except OSError:
                raise ConversionError(f"{output} could not be replaced; the previous folder is kept at {aside}.")
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def convert(args) -> Path:
    """Convert as `args` (from `parse_args`) say; returns the folder written. Raises ConversionError on bad input."""
    output = Path(args.output).expanduser().resolve()
    _check_output(output, args)
    source = load_source(args)
    tokenizer = load_tokenizer(resolve(args.tokenizer, "--tokenizer") if args.tokenizer else source.tokenizer_folder)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else source_dtype(source)
    config = build_config(source, tokenizer, args, dtype)
    plan = plan_conversion(source, config, args.dcal_init, args.gate_init)
    shapes = expected_tensors(config)
    num_parameters = sum(torch.Size(shape).numel() for shape in shapes.values())
    verify = args.verify if args.verify is not None else num_parameters < VERIFY_MAX_PARAMETERS
    report_plan(plan, source, num_parameters)

    temporary = None
    try:
        with _signals_held():  # the folder exists exactly when `temporary` names it, for the `finally` below
            temporary = _create_temporary_folder(output)
        write_weights(plan, temporary, dtype, args.max_shard_size, args.seed, shapes)
        write_code(temporary, config)
        config.save_pretrained(temporary)
        write_processor(temporary, tokenizer, config)
        write_generation_config(temporary, source, tokenizer, config)
        write_model_card(temporary, source, config, args.push_to_hub)
        if verify:
            run_verification(temporary, source.reference, dtype)
        else:
            logger.info(f"Not verified ({num_parameters / 1e9:.1f}B parameters, or --no-verify; --verify forces it).")
        set_permissions(temporary)
        _raise_if_signalled()
        with _signals_held():
            _move_into_place(temporary, output, args.overwrite)
    except OSError as error:  # a full disk, a folder made read-only meanwhile, ...
        raise ConversionError(f"Writing {output} failed, nothing was written: {error}") from None
    finally:
        if temporary is not None:
            with _signals_held():
                shutil.rmtree(temporary, ignore_errors=True)
    logger.info(f"Wrote {output}")
    if args.push_to_hub:
        push_folder(output, args.push_to_hub)
    return output


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="crosslmm-convert",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument(
        "--source",
        help="LLaVA-OneVision (transformers or LLaVA-NeXT format, or a LLaVA-NeXT-trained "
        "CrossLMM): local folder or Hub id.",
    )
    parser.add_argument("--vision", help="SigLIP/SigLIP2 checkpoint (folder or Hub id), with --text.")
    parser.add_argument("--text", help="Qwen2/Qwen2.5 LLM checkpoint (folder or Hub id), with --vision.")
    parser.add_argument("--output", required=True, help="Folder to create.")
    parser.add_argument("--overwrite", action="store_true", help="Replace --output if it exists.")
    parser.add_argument("--tokenizer", help="Tokenizer folder or Hub id (default: the source's, or --text's).")
    parser.add_argument(
        "--key-map",
        help="JSON file of regex -> replacement for the DCAL keys of a LLaVA-NeXT-trained "
        "CrossLMM, used instead of the built-in LLAVA_NEXT_DCAL_KEY_MAP.",
    )
    parser.add_argument("--pool-size", type=int, default=3, help="Pooled tokens per frame side (1, 3, 4; default 3).")
    parser.add_argument(
        "--cross-attention-interval",
        type=int,
        default=4,
        help="A DCAL after every K-th decoder layer (default 4; a trained source's own layout wins).",
    )
    parser.add_argument(
        "--v2v-scope",
        choices=("video", "frame"),
        default="video",
        help="What a pooled token sees in V2V: its whole video (default) or its frame.",
    )
    parser.add_argument(
        "--dcal-init",
        choices=("copy", "random"),
        default="copy",
        help="New DCALs' MLP: a copy of the preceding decoder layer's MLP (default) or random.",
    )
    parser.add_argument(
        "--gate-init",
        type=float,
        default=0.0,
        help="New DCALs' gates (tanh(gate) scales each branch). Default 0, the paper's: the converted model answers "
        "as the source, but the DCALs' attention learns only once a gate has moved; e.g. 0.5 trains it from the "
        "first step (and changes the model's answers before training).",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", *DTYPES),
        default="auto",
        help="Weights' dtype (default: the source LLM's embedding dtype).",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="Largest output shard (default 5GB).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the randomly initialised tensors.")
    parser.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"Compare the result with the source (default: on below {VERIFY_MAX_PARAMETERS / 1e9:.0f}B parameters).",
    )
    parser.add_argument("--push-to-hub", metavar="REPO", help="Upload the folder to this Hub repository at the end.")
    return parser.parse_args(argv)


def main(argv=None):
    """Console script `crosslmm-convert` (and `python convert_checkpoint.py`): exit status 1 with one error line on
    bad input; 128 + the signal's number (130 SIGINT, 143 SIGTERM, 129 SIGHUP) with one line when interrupted, the
    temporary folder removed and the process ended at once (`_exit_now`). From Python, call `convert` instead."""
    args = parse_args(argv)
    log_to_stderr()
    names = ("SIGINT", "SIGTERM", "SIGHUP") if threading.current_thread() is threading.main_thread() else ()
    previous = {
        sig: signal.signal(sig, _on_signal) for sig in (getattr(signal, n) for n in names if hasattr(signal, n))
    }
    _signals_received.clear()
    stderr, sys.stderr = sys.stderr, _LineTrackingStream(sys.stderr)
    unraisablehook, sys.unraisablehook = sys.unraisablehook, _ignore_lost_interruptions
    try:
        convert(args)
    except BaseException as error:
        if _signals_received:  # whatever the exception became on its way out
            signum = _signals_received[0]
            if not sys.stderr.at_line_start:  # a progress bar the signal cut off mid-line
                print(file=sys.stderr)
            print(f"error: interrupted by {signal.Signals(signum).name} (no temporary folder left)", file=sys.stderr)
            _exit_now(128 + signum)
        if isinstance(error, ConversionError):
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)
        raise
    finally:
        sys.stderr, sys.unraisablehook = stderr, unraisablehook
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    main()

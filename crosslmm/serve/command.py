"""`crosslmm-serve`'s command line: options checked, the checkpoint checked and loaded, the app run on uvicorn until
SIGINT/SIGTERM."""

import argparse
import os
import sys

from crosslmm import log_to_stderr
from crosslmm.errors import UsageError, one_line
from crosslmm.serve.app import create_app
from crosslmm.serve.engine import Engine, load_model
from crosslmm.serve.media import MediaPolicy


MODEL_TYPE = "crosslmm"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="crosslmm-serve",
        description="Serve a CrossLMM checkpoint through an OpenAI-compatible API (/v1/chat/completions).",
    )
    parser.add_argument("model", metavar="MODEL", help="checkpoint folder or Hub id")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... or auto (default: auto, i.e. device_map='auto')"
    )
    parser.add_argument(
        "--dtype", default="auto", help="bfloat16, float16, float32 or auto, the checkpoint's (default: auto)"
    )
    parser.add_argument("--attn-implementation", default=None, help="sdpa, eager, flash_attention_2, ...")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the checkpoint's own model code instead of this package's",
    )
    security = parser.add_argument_group("what clients may make the server read (see the README's Security section)")
    security.add_argument(
        "--api-key",
        default=os.environ.get("CROSSLMM_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $CROSSLMM_API_KEY, else no key)",
    )
    security.add_argument(
        "--allowed-local-media-path",
        action="append",
        default=[],
        metavar="DIR",
        help="let requests name files (file:// URLs or paths) inside DIR; repeatable (default: no local files)",
    )
    security.add_argument(
        "--allowed-media-domains",
        nargs="+",
        default=[],
        metavar="HOST",
        help="fetch http(s) media from these hosts only, at whatever address they resolve to, private ones included "
        "(default: any host at a public address)",
    )
    security.add_argument(
        "--max-media-bytes",
        type=int,
        default=256 << 20,
        help="largest medium fetched or decoded, in bytes (default: 256 MiB); a request body may be 4/3 of it + 1 MiB",
    )
    security.add_argument(
        "--media-timeout", type=float, default=10.0, help="seconds to connect and between bytes received (default: 10)"
    )
    security.add_argument(
        "--media-total-timeout", type=float, default=120.0, help="seconds for one whole download (default: 120)"
    )
    security.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="accept a request's own `chat_template` (default: refused with a 400)",
    )
    parser.add_argument("--log-level", default="warning", help="the server's log level (default: warning)")
    return parser.parse_args(argv)


def check_model(model: str, trust_remote_code: bool) -> str:
    """The checkpoint folder or Hub id, once its config says it is a CrossLMM checkpoint."""
    from transformers import AutoConfig

    path = os.path.expanduser(model)
    if os.path.exists(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UsageError(f"{model} is not a checkpoint folder (no config.json in it)")
        model = path
    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot load the config of {model}: {one_line(error)}") from None
    if config.model_type != MODEL_TYPE:
        raise UsageError(f"{model} is a {config.model_type!r} checkpoint, not CrossLMM")
    return model


def media_policy(args: argparse.Namespace) -> MediaPolicy:
    """The command line's media options, checked."""
    folders = []
    for folder in args.allowed_local_media_path:
        if not os.path.isdir(folder):
            raise UsageError(f"--allowed-local-media-path {folder}: not a folder")
        folders.append(os.path.realpath(folder))
    for name, value in (("--max-media-bytes", args.max_media_bytes), ("--media-timeout", args.media_timeout)):
        if not value > 0:
            raise UsageError(f"{name} must be positive, got {value}")
    if not args.media_total_timeout > 0:
        raise UsageError(f"--media-total-timeout must be positive, got {args.media_total_timeout}")
    return MediaPolicy(
        allowed_local_paths=tuple(folders),
        allowed_domains=tuple(host.lower().strip("[]") for host in args.allowed_media_domains),
        max_bytes=args.max_media_bytes,
        timeout=args.media_timeout,
        total_timeout=args.media_total_timeout,
    )


def serve(args: argparse.Namespace):
    """Load the checkpoint and serve it until interrupted (SIGINT/SIGTERM: generation in progress stops at its next
    token, open streams end with an error event, and the process exits)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UsageError("serving needs FastAPI and uvicorn: pip install 'crosslmm[serve]'") from None
    if args.dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise UsageError(f"--dtype {args.dtype!r}: use bfloat16, float16, float32 or auto")
    policy = media_policy(args)
    try:
        log_to_stderr("crosslmm-serve: %(levelname)s: %(message)s", args.log_level)
    except ValueError:
        raise UsageError(f"--log-level {args.log_level!r}: use debug, info, warning, error or critical") from None
    if not args.trust_remote_code:
        from crosslmm.auto import register_auto_classes

        register_auto_classes()
    model = check_model(args.model, args.trust_remote_code)
    engine = Engine(*load_model(model, args.device, args.dtype, args.attn_implementation, args.trust_remote_code))
    app = create_app(engine, model, policy, args.api_key, args.trust_request_chat_template)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            engine.stopping.set()  # ends generation in progress, so that its request can finish
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level.lower(), timeout_graceful_shutdown=5
    )
    Server(config).run()
    engine.worker.shutdown(wait=True, cancel_futures=True)


def main(argv=None) -> int:
    """Console script `crosslmm-serve`: serves until interrupted; 2 (one error line on stderr) on bad input."""
    from crosslmm.versions import warn_if_untested

    warn_if_untested("crosslmm-serve")
    args = parse_args(argv)
    try:
        serve(args)
    except UsageError as error:
        print(f"crosslmm-serve: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0

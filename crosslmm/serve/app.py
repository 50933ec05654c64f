"""The HTTP API on FastAPI: `/v1/chat/completions` (streaming as server-sent events or not), `/v1/models`, `/health`,
an optional API key. Requests are checked, their media fetched on threads of their own, and the model's work handed
to the engine's worker thread."""

import asyncio
import concurrent.futures
import hmac
import json
import logging
import os
import tempfile
import threading
import time
import uuid

from crosslmm.serve.checks import RequestError, error_body, media_url, request_problem
from crosslmm.serve.engine import Engine, Job, Stopped, make_streamer
from crosslmm.serve.media import MediaPolicy, Medium, load_medium


logger = logging.getLogger("crosslmm.serve")


def create_app(
    engine: Engine, served: str, policy: MediaPolicy, api_key: str | None = None, trust_chat_template=False
):
    """The FastAPI app: `/v1/chat/completions`, `/v1/models`, `/health`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="crosslmm-serve", docs_url=None, redoc_url=None, openapi_url=None)
    fetchers = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="crosslmm-fetch")
    scratch = tempfile.TemporaryDirectory(prefix="crosslmm-serve-")
    app.router.on_shutdown.append(lambda: (fetchers.shutdown(wait=False, cancel_futures=True), scratch.cleanup()))

    def error(problem: RequestError) -> JSONResponse:
        return JSONResponse(error_body(problem.message, problem.status, problem.param), problem.status)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if api_key is not None and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error(RequestError("Incorrect or missing API key (Authorization: Bearer ...).", 401))
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        owner = "local" if os.path.exists(served) else served.partition("/")[0]
        return {"object": "list", "data": [{"id": served, "object": "model", "created": 0, "owned_by": owner}]}

    async def read_body(request: Request) -> dict:
        """The JSON body, read up to the cap (a larger one is refused before it is all received)."""
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > policy.max_body_bytes:
            raise RequestError(
                f"The request body is larger than this server's limit of {policy.max_body_bytes} bytes.", 413
            )
        received = bytearray()
        async for chunk in request.stream():
            received += chunk
            if len(received) > policy.max_body_bytes:
                raise RequestError(
                    f"The request body is larger than this server's limit of {policy.max_body_bytes} bytes.", 413
                )
        try:
            body = json.loads(received)
        except (ValueError, RecursionError):
            raise RequestError("The request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise RequestError("The request body must be a JSON object.")
        return body

    async def fetch_media(body: dict, folder: str) -> list[Medium]:
        loop = asyncio.get_running_loop()
        parts = [
            part
            for message in body["messages"]
            if isinstance(message.get("content"), list)
            for part in message["content"]
            if part["type"] != "text"
        ]
        media = []
        for part in parts:
            kind = part["type"][:-4]
            media.append(await loop.run_in_executor(fetchers, load_medium, media_url(part), kind, folder, policy))
            part[part["type"]] = None  # a data: URL's text is no longer needed
        return media

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            body = await read_body(request)
            problem = request_problem(body, served, trust_chat_template) or engine.frames_problem(
                body.get("chat_template_kwargs") or {}
            )
            if problem:
                raise problem
            with tempfile.TemporaryDirectory(dir=scratch.name) as folder:
                media = await fetch_media(body, folder)
                job = await engine.run(engine.prepare, body, media)
        except RequestError as problem:
            logger.info(f"[{request_id}] refused: {problem.message}")
            return error(problem)
        if body.get("stream"):
            include_usage = (body.get("stream_options") or {}).get("include_usage", False)
            return StreamingResponse(stream(job, request_id, include_usage), media_type="text/event-stream")
        cancelled = threading.Event()
        try:
            answer = await engine.run(engine.generate, job, cancelled)
        except Stopped:
            return error(RequestError("The server is shutting down; the request was not answered.", 503))
        finally:
            cancelled.set()
        return {
            "id": request_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": served,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer["text"]},
                    "finish_reason": answer["finish_reason"],
                    "logprobs": None,
                }
            ],
            "usage": answer["usage"],
        }

    async def stream(job: Job, request_id: str, include_usage: bool):
        """Server-sent events: the role, the text as it comes, the finish reason (and the usage if asked), [DONE]."""
        created = int(time.time())

        def event(delta=None, finish_reason=None, usage=None) -> str:
            chunk = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": served}
            chunk["choices"] = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
            if usage is not None:
                chunk["usage"] = usage
            return f"data: {json.dumps(chunk)}\n\n"

        cancelled = threading.Event()
        streamer = make_streamer(engine.tokenizer)
        answer = asyncio.ensure_future(engine.run(engine.generate, job, cancelled, streamer))
        answer.add_done_callback(lambda done: done.cancelled() or done.exception())  # read, if the client left
        try:
            yield event({"role": "assistant", "content": ""})
            while (text := await asyncio.to_thread(next, streamer, None)) is not None:
                if text:
                    yield event({"content": text})
            try:
                result = await answer
            except Stopped:
                message = "The server is shutting down; the answer was cut short."
                yield f"data: {json.dumps(error_body(message, 503))}\n\n"
                return
            except Exception:  # the headers are sent: the stream can only say so
                logger.exception(f"[{request_id}] generation failed")
                yield f"data: {json.dumps(error_body('Generation failed on the server.', 500))}\n\n"
                return
            yield event({}, result["finish_reason"])
            if include_usage:
                yield event(usage=result["usage"])
            yield "data: [DONE]\n\n"
        finally:
            cancelled.set()  # the client went away, or the answer is complete: the worker moves on

    return app

"""The OpenAI-compatible HTTP app: ``/v1/chat/completions``, ``/v1/models``, ``/health``."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmfuse.processing.errors import RecordError
from mmfuse.processing.processor import Processor
from mmfuse.serve.batcher import Completion, DynamicBatcher, Job
from mmfuse.serve.errors import APIError
from mmfuse.serve.media import MediaLimits
from mmfuse.serve.requests import ChatRequest, RequestLimits, parse_request


@dataclass
class ServerSettings:
    """Everything the app enforces (from ``conf/serve.yaml``).

    Attributes:
        model_name: the name clients must ask for.
        api_key: when set, every route but ``/health`` needs ``Authorization: Bearer <key>``.
        max_body_bytes: largest request body.
        default_max_tokens: completion length when the request gives none.
        media: media limits.
        requests: per-request limits.
    """

    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 8_000_000
    default_max_tokens: int = 128
    media: MediaLimits = field(default_factory=MediaLimits)
    requests: RequestLimits = field(default_factory=RequestLimits)


def create_app(processor: Processor, batcher: DynamicBatcher, settings: ServerSettings) -> FastAPI:
    """Builds the app around a running batcher (which owns the model).

    Requests are processed (media decoded, the prompt tokenized) on one thread of their own,
    first come first served, so that the event loop goes on streaming meanwhile. Processing
    is Python that holds the interpreter lock, so more threads would not process faster:
    with anyio's pool, a burst of requests shared the lock among a dozen threads and each
    waited for all (4-7 ms for 0.3 ms of work on the demo model at concurrency 16)."""
    app = FastAPI(title="mmfuse", docs_url=None, redoc_url=None, openapi_url=None)
    processing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmfuse-processor")
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(err.status_code, str(err.detail)).body(), err.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(400, f"invalid request: {err.errors()}").body(), 400)

    @app.exception_handler(Exception)
    async def server_error(_: Request, err: Exception) -> JSONResponse:
        message = f"internal error ({type(err).__name__}); see the server log"
        return JSONResponse(APIError(500, message).body(), status_code=500)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip(), settings.api_key):
            raise APIError(401, "missing or wrong API key (Authorization: Bearer <key>)")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        card = {"id": settings.model_name, "object": "model", "created": created}
        return {"object": "list", "data": [{**card, "owned_by": "mmfuse"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        chat = parse_request(
            await _json_body(request, settings.max_body_bytes),
            settings.media,
            settings.requests,
            settings.default_max_tokens,
        )
        if chat.model != settings.model_name:
            raise APIError(
                404,
                f"model {chat.model!r} not found; this server has {settings.model_name!r}",
                "model",
                "model_not_found",
            )
        try:
            loop = asyncio.get_running_loop()
            sample = await loop.run_in_executor(processing, processor.prompt, chat.messages)
        except RecordError as err:
            raise APIError(400, f"cannot process the messages: {err}", "messages") from err
        if chat.stream:
            return StreamingResponse(
                _stream(batcher, sample, chat, settings.model_name), media_type="text/event-stream"
            )
        jobs = [Job(sample, config, chat.stop) for config in chat.choices]
        done = await asyncio.gather(*map(asyncio.wrap_future, batcher.submit_all(jobs)))
        return _response(chat, done, len(sample.input_ids), settings.model_name)

    return app


async def _json_body(request: Request, limit: int) -> object:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes is over the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"request body is over the limit of {limit} bytes")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON ({err})") from err


def _response(chat: ChatRequest, done: list[Completion], prompt_tokens: int, model: str) -> dict:
    completion_tokens = sum(c.completion_tokens for c in done)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(done)
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


async def _stream(
    batcher: DynamicBatcher, sample, chat: ChatRequest, model: str
) -> AsyncIterator[str]:
    """Server-sent events in the OpenAI chunk format, ending with ``data: [DONE]``."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(choices: list[dict], **extra) -> str:
        body = {"id": ident, "object": "chat.completion.chunk", "created": created}
        return f"data: {json.dumps({**body, 'model': model, 'choices': choices, **extra})}\n\n"

    def on_text(index: int):
        return lambda text: loop.call_soon_threadsafe(events.put_nowait, (index, text))

    jobs = [Job(sample, c, chat.stop, on_text(i)) for i, c in enumerate(chat.choices)]
    futures = [asyncio.wrap_future(f) for f in batcher.submit_all(jobs)]
    for i, future in enumerate(futures):
        future.add_done_callback(lambda f, i=i: events.put_nowait((i, f)))
    for i in range(len(chat.choices)):
        yield chunk(
            [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
        )
    open_choices, completion_tokens = len(futures), 0
    while open_choices:
        index, item = await events.get()
        if isinstance(item, str):
            yield chunk([{"index": index, "delta": {"content": item}, "finish_reason": None}])
            continue
        open_choices -= 1
        if item.exception() is not None:
            error = APIError(500, f"generation failed ({type(item.exception()).__name__})")
            yield f"data: {json.dumps(error.body())}\n\n"
            return
        done: Completion = item.result()
        completion_tokens += done.completion_tokens
        yield chunk([{"index": index, "delta": {}, "finish_reason": done.finish_reason}])
    if chat.include_usage:
        prompt_tokens = len(sample.input_ids)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        yield chunk([], usage=usage)
    yield "data: [DONE]\n\n"

"""The OpenAI-compatible HTTP API: routes, streaming, errors in OpenAI's shape."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from thrifty.engine.outputs import CompletionOutput, RequestOutput
from thrifty.engine.sampler import TokenLogprob
from thrifty.errors import InvalidRequestError, PromptTooLongError
from thrifty.server.engine_client import AsyncEngine, EngineError, GenerationStream, QueueFullError, ServerDrainingError
from thrifty.server.metrics import CONTENT_TYPE
from thrifty.server.protocol import (
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs,
    ChatMessageOut, ChatTokenLogprob, CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse,
    DeltaMessage, ErrorInfo, ErrorResponse, ModelCard, ModelList, PromptTokensDetails, SamplingFields, TopLogprob,
    Usage)

logger = logging.getLogger("thrifty.server")

RETRY_AFTER_SECONDS = 1
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

R = TypeVar("R", bound=SamplingFields)


class APIError(Exception):
    """An error to send back as {"error": {...}} with the given HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers)


def create_app(engine_client: AsyncEngine, served_model_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the engine thread."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine_client.start()
        yield
        engine_client.shutdown()

    app = FastAPI(title="thrifty", lifespan=lifespan)
    _install_error_handlers(app)
    app.include_router(_health_routes(engine_client))
    app.include_router(_v1_routes(engine_client, served_model_name), dependencies=[Depends(_auth(api_key))])
    return app


# -- errors -----------------------------------------------------------------------------------


def _install_error_handlers(app: FastAPI) -> None:
    def handler(convert: Callable[[Any], APIError]) -> Callable[[Request, Any], Awaitable[Response]]:
        async def handle(_: Request, error: Any) -> Response:
            return convert(error).response()
        return handle

    app.add_exception_handler(APIError, handler(lambda e: e))
    app.add_exception_handler(PromptTooLongError, handler(
        lambda e: APIError(400, str(e), code="context_length_exceeded")))
    app.add_exception_handler(InvalidRequestError, handler(lambda e: APIError(400, str(e))))
    app.add_exception_handler(QueueFullError, handler(lambda e: APIError(
        429, str(e), type="requests", code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})))
    app.add_exception_handler(ServerDrainingError, handler(
        lambda e: APIError(503, str(e), type="server_error", code="service_unavailable")))
    app.add_exception_handler(EngineError, handler(lambda e: APIError(500, str(e), type="server_error")))

    async def http_error(request: Request, error: HTTPException) -> Response:
        message = (f"invalid URL ({request.method} {request.url.path})" if error.status_code in (404, 405)
                   else str(error.detail))
        return APIError(error.status_code, message, headers=error.headers).response()

    app.add_exception_handler(HTTPException, http_error)

    async def unexpected(_: Request, error: Exception) -> Response:
        logger.exception("unhandled error", exc_info=error)
        return APIError(500, f"internal error: {type(error).__name__}", type="server_error").response()

    app.add_exception_handler(Exception, unexpected)


def _parse(model: type[R], body: bytes) -> R:
    """Validate a JSON body; malformed JSON and wrong types become 400s naming the field."""
    try:
        request = model.model_validate_json(body)
    except ValidationError as error:
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            raise APIError(400, f"the request body is not valid JSON: {first['msg']}") from None
        if first["type"] == "model_type":
            raise APIError(400, "the request body must be a JSON object") from None
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors()[:3])
        param = str(first["loc"][0]) if first["loc"] else None
        raise APIError(400, f"invalid request: {problems}", param=param) from None
    if request.model_extra:
        logger.warning("ignoring unknown request fields: %s", ", ".join(sorted(request.model_extra)))
    return request


# -- routes -------------------------------------------------------------------------------------


def _auth(api_key: str | None) -> Callable[[Request], None]:
    expected = f"Bearer {api_key}".encode() if api_key else None

    def check(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):  # constant time: no timing hints about the key
            raise APIError(401, "missing or incorrect API key; send it as 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    return check


def _health_routes(client: AsyncEngine) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> Response:
        if client.draining:
            raise ServerDrainingError("the server is shutting down")
        if not client.is_running:
            raise EngineError("the engine thread is not running")
        return JSONResponse({"status": "ok"})

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(client.metrics.render(), media_type=CONTENT_TYPE)

    return router


def _v1_routes(client: AsyncEngine, served_model_name: str) -> APIRouter:
    router = APIRouter(prefix="/v1")
    vocab_size = client.tokenizer.vocab_size

    def card() -> ModelCard:
        return ModelCard(id=served_model_name, max_model_len=client.max_model_len)

    def check_model(name: str | None) -> None:
        if name is not None and name != served_model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {served_model_name!r}",
                           param="model", code="model_not_found")

    @router.get("/models")
    async def list_models() -> ModelList:
        return ModelList(data=[card()])

    @router.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> ModelCard:
        check_model(model_id)
        return card()

    @router.post("/completions")
    async def completions(raw: Request) -> Response:
        request = _parse(CompletionRequest, await raw.body())
        check_model(request.model)
        request.check_supported(vocab_size)
        prompts = request.prompts()
        params = request.sampling_params(request.max_tokens, request.logprobs)
        writer = _CompletionWriter(client, request, prompts, served_model_name)
        if request.stream:
            stream = await client.generate(writer.id, prompts, params)
            return _sse(writer.events(stream))
        return await _unless_disconnected(raw, _collect(client, writer, prompts, params))

    @router.post("/chat/completions")
    async def chat_completions(raw: Request) -> Response:
        request = _parse(ChatCompletionRequest, await raw.body())
        check_model(request.model)
        request.check_supported(vocab_size)
        prompt = client.render_chat([m.for_template(i) for i, m in enumerate(request.messages)])
        params = request.sampling_params(request.max_new_tokens, request.num_logprobs)
        writer = _ChatWriter(client, request, served_model_name)
        if request.stream:
            stream = await client.generate(writer.id, [prompt], params)
            return _sse(writer.events(stream))
        return await _unless_disconnected(raw, _collect(client, writer, [prompt], params))

    return router


# -- running a request -------------------------------------------------------------------------


async def _collect(client: AsyncEngine, writer: _CompletionWriter | _ChatWriter, prompts: list[Any],
                   params: Any) -> Response:
    stream = await client.generate(writer.id, prompts, params)
    final: dict[int, RequestOutput] = {}
    try:
        async for index, output in stream:
            final[index] = output
    finally:
        stream.abort()  # only does something if we were cancelled (client gone) or failed
    return JSONResponse(writer.full_response([final[i] for i in range(len(prompts))]).model_dump())


async def _unless_disconnected(raw: Request, work: Awaitable[Response]) -> Response:
    """Run a non-streamed request, cancelling it (which aborts it in the engine) if the client leaves."""

    async def disconnected() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        watcher.cancel()
        return task.result()
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task
    return Response(status_code=499)  # nobody is left to read it; 499 is nginx's "client closed request"


def _sse(events: AsyncIterator[BaseModel | str]) -> StreamingResponse:
    async def encode() -> AsyncIterator[str]:
        async for event in events:
            yield f"data: {event if isinstance(event, str) else event.model_dump_json()}\n\n"

    return StreamingResponse(encode(), media_type="text/event-stream", headers=SSE_HEADERS)


def _stream_error(error: EngineError) -> str:
    return ErrorResponse(error=ErrorInfo(message=str(error), type="server_error")).model_dump_json()


def _usage(outputs: list[RequestOutput]) -> Usage:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = sum(o.num_cached_prompt_tokens for o in outputs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def _logprobs_of(completion: CompletionOutput, start: int) -> list[TokenLogprob]:
    # The engine keeps appending to the list it handed out, so cut it at this output's tokens.
    return (completion.logprobs or [])[start:len(completion.token_ids)]


class _Writer:
    """Shared by the two endpoints: ids, token text, per-choice streaming state."""

    prefix = ""

    def __init__(self, client: AsyncEngine, request: SamplingFields, model: str) -> None:
        self.client, self.request, self.model = client, request, model
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.sent_logprobs: dict[int, int] = {}
        self.finished: set[int] = set()

    def token_text(self, token_id: int) -> str:
        return self.client.tokenizer.decode([token_id], skip_special_tokens=False)

    def new_logprobs(self, choice: int, completion: CompletionOutput) -> list[TokenLogprob] | None:
        if completion.logprobs is None:
            return None
        entries = _logprobs_of(completion, self.sent_logprobs.get(choice, 0))
        self.sent_logprobs[choice] = len(completion.token_ids)
        return entries

    def newly_finished(self, choice: int, completion: CompletionOutput) -> bool:
        if completion.finish_reason is None or choice in self.finished:
            return False
        self.finished.add(choice)
        return True


class _CompletionWriter(_Writer):
    prefix = "cmpl"

    def __init__(self, client: AsyncEngine, request: CompletionRequest, prompts: list[Any], model: str) -> None:
        super().__init__(client, request, model)
        self.request: CompletionRequest = request
        self.prompts = prompts

    def echo_text(self, prompt_index: int) -> str:
        if not self.request.echo:
            return ""
        prompt = self.prompts[prompt_index]
        return prompt if isinstance(prompt, str) else self.client.tokenizer.decode(prompt)

    def logprobs(self, entries: list[TokenLogprob] | None, offset: int) -> CompletionLogprobs | None:
        if entries is None:
            return None
        out = CompletionLogprobs()
        for entry in entries:
            text = self.token_text(entry.token_id)
            out.tokens.append(text)
            out.token_logprobs.append(entry.logprob)
            top = {self.token_text(t): lp for t, lp in entry.top}
            top.setdefault(text, entry.logprob)
            out.top_logprobs.append(top)
            out.text_offset.append(offset)
            offset += len(text)
        return out

    def chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def full_response(self, outputs: list[RequestOutput]) -> CompletionResponse:
        choices = []
        for p, output in enumerate(outputs):
            echo = self.echo_text(p)
            for c in output.outputs:
                logprobs = self.logprobs(_logprobs_of(c, 0), len(echo)) if c.logprobs is not None else None
                choices.append(CompletionChoice(index=p * self.request.n + c.index, text=echo + c.text,
                                                logprobs=logprobs, finish_reason=c.finish_reason))
        return self.chunk(choices, _usage(outputs))

    async def events(self, stream: GenerationStream) -> AsyncIterator[BaseModel | str]:
        n = self.request.n
        latest: dict[int, RequestOutput] = {}
        text_len: dict[int, int] = {}
        try:
            for p in range(len(self.prompts)):
                if echo := self.echo_text(p):
                    for i in range(n):
                        text_len[p * n + i] = len(echo)
                        yield self.chunk([CompletionChoice(index=p * n + i, text=echo)])
            async for p, output in stream:
                latest[p] = output
                for c in output.outputs:
                    choice = p * n + c.index
                    entries = self.new_logprobs(choice, c)
                    finishing = self.newly_finished(choice, c)
                    if not (c.delta_text or entries or finishing):
                        continue
                    logprobs = self.logprobs(entries, text_len.get(choice, 0))
                    text_len[choice] = text_len.get(choice, 0) + len(c.delta_text)
                    yield self.chunk([CompletionChoice(index=choice, text=c.delta_text, logprobs=logprobs,
                                                       finish_reason=c.finish_reason if finishing else None)])
            if self.request.include_usage_in_stream:
                yield self.chunk([], _usage([latest[p] for p in range(len(self.prompts))]))
        except EngineError as error:
            yield _stream_error(error)
        finally:
            stream.abort()
        yield "[DONE]"


class _ChatWriter(_Writer):
    prefix = "chatcmpl"

    def __init__(self, client: AsyncEngine, request: ChatCompletionRequest, model: str) -> None:
        super().__init__(client, request, model)
        self.request: ChatCompletionRequest = request

    def logprobs(self, entries: list[TokenLogprob] | None) -> ChatLogprobs | None:
        if entries is None:
            return None

        def item(token_id: int, logprob: float) -> TopLogprob:
            text = self.token_text(token_id)
            return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))

        content = []
        for entry in entries:
            sampled = item(entry.token_id, entry.logprob)
            content.append(ChatTokenLogprob(**sampled.model_dump(),
                                            top_logprobs=[item(t, lp) for t, lp in entry.top]))
        return ChatLogprobs(content=content)

    def chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def full_response(self, outputs: list[RequestOutput]) -> ChatCompletionResponse:
        output = outputs[0]
        choices = [ChatChoice(index=c.index, message=ChatMessageOut(content=c.text),
                              logprobs=self.logprobs(_logprobs_of(c, 0) if c.logprobs is not None else None),
                              finish_reason=c.finish_reason)
                   for c in output.outputs]
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                      usage=_usage(outputs))

    async def events(self, stream: GenerationStream) -> AsyncIterator[BaseModel | str]:
        latest: RequestOutput | None = None
        try:
            for i in range(self.request.n):  # OpenAI opens each choice with the role and empty content
                yield self.chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
            async for _, output in stream:
                latest = output
                for c in output.outputs:
                    entries = self.new_logprobs(c.index, c)
                    finishing = self.newly_finished(c.index, c)
                    if c.delta_text or entries:
                        yield self.chunk([ChatChunkChoice(index=c.index, delta=DeltaMessage(content=c.delta_text),
                                                          logprobs=self.logprobs(entries))])
                    if finishing:
                        yield self.chunk([ChatChunkChoice(index=c.index, delta=DeltaMessage(),
                                                          finish_reason=c.finish_reason)])
            if self.request.include_usage_in_stream and latest is not None:
                yield self.chunk([], _usage([latest]))
        except EngineError as error:
            yield _stream_error(error)
        finally:
            stream.abort()
        yield "[DONE]"

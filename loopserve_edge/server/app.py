"""The HTTP API (FastAPI/Starlette, served by uvicorn): OpenAI's /v1/chat/completions,
/v1/completions, /v1/responses and /v1/models, Anthropic's /v1/messages, /health, Prometheus
/metrics and a small chat page at /.

Every error is a JSON body in the shape of the API asked (OpenAI's, or Anthropic's under
/v1/messages); the server keeps serving after any of them.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import messages_api, openai_api, responses_api
from . import protocol
from .engine import Engine
from .protocol import ApiError
from .responses_store import ResponseStore

log = logging.getLogger("loopserve_edge.server")
STATIC = Path(__file__).parent / "static"
DIALOGUE_HEADER = "X-Dialogue-Id"
# besides /v1/*, the paths an API key guards (llama-server's token endpoints)
KEYED = ("/tokenize", "/detokenize")


def _error(e: ApiError, path: str) -> JSONResponse:
    return JSONResponse(e.body(path), status_code=e.status, headers=e.headers)


def _key(request: Request) -> str:
    """The API key a request gives: OpenAI's clients send 'Authorization: Bearer KEY',
    Anthropic's 'x-api-key: KEY' (or the Bearer form, given an auth token)."""
    got = request.headers.get("authorization", "")
    if got.startswith("Bearer "):
        return got[len("Bearer "):]
    return request.headers.get("x-api-key", "")


def _piece(b: bytes):
    """A token's text as llama-server gives it: a string, or its bytes where they are not whole
    UTF-8 (part of a character)."""
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return list(b)


def create_app(engine: Engine, api_key: str | None = None, cors_origins: tuple[str, ...] = ()) -> FastAPI:
    opts = engine.opts
    stop_saver = threading.Event()
    responses = ResponseStore(opts.dialogues_dir / "responses")

    @asynccontextmanager
    async def lifespan(app):
        saver = threading.Thread(target=engine.saver, args=(stop_saver,), daemon=True)
        saver.start()
        try:
            yield
        finally:
            # SIGTERM / SIGINT end up here through uvicorn: every changed dialogue is saved
            stop_saver.set()
            saver.join(timeout=5)
            await anyio.to_thread.run_sync(engine.stop)
            n = engine.save()
            log.info("saved %d dialogues to %s", n, opts.dialogues_dir)

    app = FastAPI(title="loopserve-edge", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        engine.metrics.request(request.url.path, e.status)
        return _error(e, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        engine.metrics.request(request.url.path, e.status_code)
        code = "not_found" if e.status_code == 404 else None
        return _error(ApiError(e.status_code, str(e.detail), code=code), request.url.path)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("internal error on %s", request.url.path)
        engine.metrics.request(request.url.path, 500)
        return _error(ApiError(500, f"internal error ({type(e).__name__})", type="server_error"), request.url.path)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and (request.url.path.startswith("/v1/") or request.url.path in KEYED):
            if not hmac.compare_digest(_key(request).encode(), api_key.encode()):
                engine.metrics.request(request.url.path, 401)
                return _error(ApiError(401, "invalid or missing API key (Authorization: Bearer ..., or x-api-key)",
                                       code="invalid_api_key"), request.url.path)
        return await call_next(request)

    if cors_origins:
        # added after the key check, so it runs first: a browser's preflight carries no key, and
        # the answers (errors too) carry the headers that let the page read them
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["*"], expose_headers=[DIALOGUE_HEADER])

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": opts.model_name}

    def model_card() -> dict:
        created = int(engine.llm.model_path.stat().st_mtime)
        # OpenAI's fields, then Anthropic's (each API's clients read their own, ignore the rest)
        return {"id": opts.model_name, "object": "model", "created": created, "owned_by": "loopserve-edge",
                "type": "model", "display_name": opts.model_name, "lifecycle": "active",
                "created_at": datetime.fromtimestamp(created, timezone.utc).isoformat().replace("+00:00", "Z"),
                "max_input_tokens": engine.llm.n_ctx}

    @app.get("/v1/models")
    async def models():
        engine.metrics.request("/v1/models", 200)
        return {"object": "list", "data": [model_card()], "has_more": False, "first_id": opts.model_name,
                "last_id": opts.model_name}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        if model != opts.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server has {opts.model_name!r}",
                           param="model", code="model_not_found")
        engine.metrics.request("/v1/models", 200)
        return model_card()

    @app.post("/tokenize")
    async def tokenize(request: Request):
        """llama-server's: the token ids of a text (for clients that count tokens themselves)."""
        content, add_special, with_pieces = protocol.parse_tokenize(await request.body())
        llm = engine.llm
        toks = await anyio.to_thread.run_sync(lambda: llm.tokenize(content, add_bos=add_special and llm.add_bos))
        engine.metrics.request("/tokenize", 200)
        if not with_pieces:
            return {"tokens": toks}
        return {"tokens": [{"id": t, "piece": _piece(llm._piece(t, special=True))} for t in toks]}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        toks = protocol.parse_detokenize(await request.body(), engine.llm.n_vocab)
        engine.metrics.request("/detokenize", 200)
        return {"content": engine.llm.detokenize(toks, special=True)}

    @app.get("/metrics")
    async def metrics():
        gauges = await anyio.to_thread.run_sync(engine.gauges)
        return PlainTextResponse(engine.metrics.render(gauges), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html")

    def check_model(req) -> None:
        if req.model != opts.model_name:
            raise ApiError(404, f"the model {req.model!r} does not exist; this server has {opts.model_name!r}",
                           param="model", code="model_not_found")

    def thinking(req):
        """A chat request with its reply's thinking read apart or not (reasoning.py)."""
        return openai_api.with_thinking(req, opts.reasoning_format, engine.llm.template)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = thinking(protocol.parse_chat_request(await request.body(), opts.model_name))
        check_model(req)
        did = request.headers.get(DIALOGUE_HEADER)
        if req.n == 1:
            return await _answer(request, req, did, openai_api.ChatShapes(req, engine.llm.fingerprint))
        if did is not None:
            raise ApiError(400, f"several choices (n > 1) branch from the conversation their messages give; "
                           f"{DIALOGUE_HEADER} would make each the next turn of one dialogue", param="n")
        if req.stream:
            return await _stream_several(request, openai_api.choices(req), one_prompt=True)
        return await _several(request, openai_api.choices(req), one_prompt=True)

    @app.post("/v1/completions")
    async def text(request: Request):
        reqs = protocol.parse_text_requests(await request.body(), opts.model_name, engine.llm)
        check_model(reqs[0])
        if request.headers.get(DIALOGUE_HEADER) is not None:
            raise ApiError(400, f"{DIALOGUE_HEADER} names a chat dialogue; a text completion goes on in the "
                           "dialogue whose text its prompt starts with", param=DIALOGUE_HEADER)
        if len(reqs) == 1 and reqs[0].n == 1:
            return await _answer(request, reqs[0], None, openai_api.TextShapes(reqs[0], engine.llm.fingerprint))
        several = [c for r in reqs for c in openai_api.choices(r)]
        if reqs[0].stream:
            return await _stream_several(request, several, one_prompt=len(reqs) == 1)
        return await _several(request, several, one_prompt=len(reqs) == 1)

    async def _stream_several(request: Request, reqs: list, one_prompt: bool):
        """Several choices streamed: run one after another as _several runs them, each
        choice's chunks with its index (openai_api.StreamChoices)."""
        engine.admit()
        return await _stream(request.url.path, [(r, _shapes(r)) for r in reqs], None, one_prompt)

    def _shapes(req):
        return (openai_api.TextShapes if isinstance(req, openai_api.TextRequest) else openai_api.ChatShapes)(
            req, engine.llm.fingerprint)

    async def _several(request: Request, reqs: list, one_prompt: bool):
        """Several choices (`n`, several text prompts; not streamed): each a request of its
        own, one after another (a chat's next choices branch from the dialogue the first went
        on in, its KV copied: they prefill nothing again; scoring requests in the order of
        their prompts, openai_api.run_order), as one response, in the order asked."""
        answers = [None] * len(reqs)
        for i in openai_api.run_order(reqs):
            answers[i] = await _answer(request, reqs[i], None, _shapes(reqs[i]))
        did = answers[0].headers.get(DIALOGUE_HEADER)
        return JSONResponse(openai_api.merge_responses([json.loads(a.body) for a in answers], one_prompt),
                            headers={DIALOGUE_HEADER: did} if did else {})

    @app.post("/v1/responses")
    async def create_response(request: Request):
        """OpenAI's Responses API over the chat path; previous_response_id finds the conversation
        (responses_api.py), stored responses are kept beside the dialogues' state files."""
        body, req, added = protocol.parse_response_request(await request.body(), responses, opts.model_name)
        req = thinking(req)
        check_model(req)
        prev = body.get("previous_response_id")

        def done(obj: dict, message: dict) -> None:
            if obj["store"]:
                responses.save(obj, prev, added + [message])

        return await _answer(request, req, None,
                             responses_api.ResponseShapes(req, engine.llm.fingerprint, body, prev, done))

    calls = messages_api.CallTexts()

    @app.post("/v1/messages")
    async def create_message(request: Request):
        """Anthropic's Messages API over the chat path (messages_api.py)."""
        req = thinking(protocol.parse_messages_request(await request.body(), calls, opts.model_name))
        check_model(req)
        return await _answer(request, req, request.headers.get(DIALOGUE_HEADER),
                             messages_api.MessageShapes(req, engine.llm.fingerprint, calls))

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request):
        req = protocol.parse_messages_request(await request.body(), calls, opts.model_name)
        check_model(req)
        n = await anyio.to_thread.run_sync(engine.count_tokens, req)
        engine.metrics.request("/v1/messages/count_tokens", 200)
        return {"input_tokens": n}

    @app.get("/v1/responses/{rid}")
    async def get_response(rid: str):
        engine.metrics.request("/v1/responses", 200)
        return responses.get(rid)

    @app.delete("/v1/responses/{rid}")
    async def delete_response(rid: str):
        responses.delete(rid)
        engine.metrics.request("/v1/responses", 200)
        return {"id": rid, "object": "response", "deleted": True}

    async def _answer(request: Request, req, dialogue_id: str | None, shapes):
        path = request.url.path
        engine.admit()
        if not req.stream:
            try:
                text, stats, did, logprobs = await anyio.to_thread.run_sync(
                    engine.run, req, dialogue_id, lambda *_: None, threading.Event())
            finally:
                engine.release()
            engine.metrics.request(path, 200)
            return JSONResponse(shapes.response(text, stats, did, logprobs),
                                headers={DIALOGUE_HEADER: did} if did else {})
        return await _stream(path, [(req, shapes)], dialogue_id)

    async def _stream(path: str, items: list, dialogue_id, one_prompt: bool = True):
        """A stream of one request's reply, or of several choices' (`items`: (request, shapes)
        each, run one after another, each choice's chunks with its index and the usage once at
        the end, as openai_api.StreamChoices merges them)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def emit(piece: str, logprobs: list | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ("piece", (piece, logprobs)))

        def started(did: str, prompt: tuple[int, int]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ("start", (did, prompt)))

        async def work():
            try:
                for req, _ in items:
                    result = await anyio.to_thread.run_sync(engine.run, req, dialogue_id, emit, cancelled, started)
                    queue.put_nowait(("done", result))
                    if cancelled.is_set():
                        break
            except ApiError as e:
                queue.put_nowait(("error", e))
            except Exception as e:  # noqa: BLE001 (reported in the stream, the server goes on)
                log.exception("internal error in a stream")
                queue.put_nowait(("error", ApiError(500, f"internal error ({type(e).__name__})",
                                                    type="server_error")))
            finally:
                engine.release()

        task = asyncio.create_task(work())
        # the first event decides the status: an error before the prompt is in is a plain error
        # reply; after it, the stream starts, with the dialogue's id in a header
        kind, value = await queue.get()
        if kind == "error":
            await task
            engine.metrics.request(path, value.status)
            return _error(value, path)
        did, prompt = value
        engine.metrics.request(path, 200)
        shapes = items[0][1] if len(items) == 1 else openai_api.StreamChoices([s for _, s in items], one_prompt)

        async def events():
            try:
                for c in shapes.start(prompt):
                    yield protocol.sse(c)
                done = 0
                while done < len(items):
                    k, v = await queue.get()
                    if k == "start":   # the next choice's prompt is in
                        for c in shapes.start(v[1]):
                            yield protocol.sse(c)
                    elif k == "piece":
                        for c in shapes.piece(*v):
                            yield protocol.sse(c)
                    elif k == "error":
                        yield protocol.sse(v.body(path))
                        break
                    else:
                        _, stats, did, logprobs = v
                        for c in shapes.end(stats, logprobs, did):
                            yield protocol.sse(c)
                        done += 1
                        if done == len(items) and items[0][0].include_usage:
                            yield protocol.sse(shapes.usage(stats, did))
                if shapes.done_marker:
                    yield b"data: [DONE]\n\n"
            finally:
                cancelled.set()   # a client gone mid-stream: the worker stops at the next token
                await asyncio.shield(task)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", DIALOGUE_HEADER: did})

    return app

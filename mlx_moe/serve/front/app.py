"""The OpenAI-compatible HTTP API (rank 0): validation, queueing jobs to the
engine (429 when its queue is full), plain and streamed (SSE) responses,
and cancelling the job of a client that went away."""

import asyncio
import dataclasses
import json
import time
import uuid
from contextlib import aclosing
from pathlib import Path
from typing import Dict, List, Optional

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from .anthropic import Generation, anthropic_router
from .chat import ChatOutput, build_prompt
from ..channel import Job, QueueFull
from .http import DEFAULT_MAX_BODY_BYTES, BodyLimit, error_body, route_paths
from .metrics import CountRequests, Metrics
from .schema import DEFAULT_MAX_TOKENS, APIError, ChatRequest, CompletionRequest, Sampling, encode
from .status import status_router
from ..structured import RequestError

LOGPROB_FLOOR = -9999.0  # vLLM's, for -inf (not JSON)
RETRY_AFTER = 1  # seconds a client refused for a full queue is told to wait


def create_app(engine, model_id: str, context_length: int, plan_text: str = "",
               api_key: Optional[str] = None, max_body_bytes: Optional[int] = None, cluster=None) -> FastAPI:
    app = FastAPI(title="mlx-moe", description="OpenAI-compatible API of an mlx-moe cluster")
    app.add_middleware(BodyLimit, limit=max_body_bytes or DEFAULT_MAX_BODY_BYTES)
    tokenizer = engine.tokenizer
    vocab_size = len(tokenizer.get_vocab())

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        # "/" is the status page: static, it asks for the key itself.
        open_paths = ("/", "/health")
        if api_key and request.url.path not in open_paths:
            # OpenAI's clients send the key as a bearer token, Anthropic's as x-api-key.
            if (request.headers.get("authorization", "") != f"Bearer {api_key}"
                    and request.headers.get("x-api-key") != api_key):
                return JSONResponse(error_body("Missing or wrong API key (Authorization: Bearer ... "
                                               "or x-api-key: ...).", code="invalid_api_key"), status_code=401)
        return await call_next(request)
    metrics = Metrics(engine)
    app.add_middleware(CountRequests, metrics=metrics)  # outermost: counts 401 and 413 too
    names = {model_id, Path(model_id).name}
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status,
                            headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        err = e.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = err.get("msg", "invalid request")
        if err.get("type") == "json_invalid":
            message, param = "The request body is not valid JSON.", None
        elif param:
            message = f"{param}: {message}"
        return JSONResponse(error_body(message, param=param, code=err.get("type")), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail)), status_code=e.status_code)

    @app.get("/metrics")
    def prometheus_metrics():  # not async: rendering runs off the event loop
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    # One entry in both clients' shapes: OpenAI's (object, created, owned_by)
    # and Anthropic's (type, display_name, created_at; has_more, first_id, last_id).
    model_entry = {"id": model_id, "object": "model", "created": created, "owned_by": "mlx-moe",
                   "type": "model", "display_name": Path(model_id).name,
                   "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_entry], "has_more": False,
                "first_id": model_id, "last_id": model_id}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        if model not in names:
            raise APIError(404, f"The model {model!r} does not exist; this server serves {model_id!r}.",
                           param="model", code="model_not_found")
        return model_entry

    @app.get("/v1/plan")
    async def plan():
        return {"plan": plan_text}

    def prepare(req: Sampling, prompt: List[int]) -> Job:
        if req.model not in names:
            raise APIError(404, f"The model {req.model!r} does not exist; this server serves {model_id!r}.",
                           param="model", code="model_not_found")
        if not prompt:
            raise APIError(400, "The prompt is empty.", param="prompt", code="empty_prompt")
        room = context_length - len(prompt)
        if room <= 0:
            raise APIError(400, f"The prompt is {len(prompt)} tokens; the context is {context_length}.",
                           param="messages" if isinstance(req, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        max_tokens = req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS
        stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        stop_ids = req.stop_token_ids or []
        if any(not 0 <= t < vocab_size for t in stop_ids):
            raise APIError(400, f"stop_token_ids has an id outside the vocabulary (0 to {vocab_size - 1}).",
                           param="stop_token_ids")
        return Job(prompt=prompt, max_tokens=min(max_tokens, room), temperature=req.temperature,
                   top_p=req.top_p, top_k=req.top_k, min_p=req.min_p, seed=req.seed, stop=stop,
                   stop_token_ids=stop_ids, logprobs=req.top_logprobs_count(),
                   logit_bias=logit_bias(req.logit_bias), repetition_penalty=req.repetition_penalty,
                   presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty)

    def choices(req: Sampling, job: Job) -> List[Job]:
        """The job of each of the request's n choices: with a seed, choice i
        samples with seed + i, so they differ and each reproduces."""
        return [dataclasses.replace(job, seed=None if job.seed is None else job.seed + i) for i in range(req.n)]

    def logit_bias(bias: Optional[Dict[str, float]]) -> Dict[int, float]:
        """OpenAI's form (token id as a string -> bias in [-100, 100]) as ids."""
        out = {}
        for key, value in (bias or {}).items():
            token = int(key) if key.isascii() and key.isdigit() and len(key) < 12 else vocab_size
            if token >= vocab_size:
                raise APIError(400, f"logit_bias has {key!r}, which is not a token id below {vocab_size}.",
                               param="logit_bias")
            if not -100 <= value <= 100:
                raise APIError(400, f"logit_bias[{key!r}] is {value}; biases go from -100 to 100.",
                               param="logit_bias")
            out[token] = value
        return out

    def start(job: Job):
        """Queue the job (429 if the queue is full); its events, as they come."""
        return start_all([job])[0]

    def start_all(jobs: List[Job]):
        """Queue the jobs together, to join the batch in one step, or none
        (429 if the queue has no room for all); each one's events."""
        loop = asyncio.get_running_loop()
        queues = []
        for job in jobs:
            events: asyncio.Queue = asyncio.Queue()
            job.emit = metrics.track(lambda event, q=events: loop.call_soon_threadsafe(q.put_nowait, event))
            queues.append(events)
        try:
            engine.submit(*jobs)
        except QueueFull as e:
            for job in jobs:
                job.emit.refused()
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER)})
        return [_events(job, events) for job, events in zip(jobs, queues)]

    async def _events(job: Job, events: asyncio.Queue):
        ended = False
        engine.open_responses += 1
        try:
            while True:
                event = await events.get()
                if event[0] in ("done", "error"):
                    ended = True
                    engine.open_responses -= 1
                    yield event
                    return
                yield event
        finally:
            if not ended:  # the client went away (this task was cancelled)
                engine.open_responses -= 1
                engine.cancel(job)

    async def merged(streams):
        """(choice index, event) of several jobs' streams, as they come."""
        if len(streams) == 1:
            async for event in streams[0]:
                yield 0, event
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, stream):
            async for event in stream:
                queue.put_nowait((i, event))
        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        try:
            left = len(streams)
            while left:
                i, event = await queue.get()
                left -= event[0] in ("done", "error")
                yield i, event
        finally:
            for t in tasks:  # cancelling a pump cancels its job
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def until_disconnected(request: Request):
        # The body is read: what comes next is the end of the connection.
        while (await request.receive())["type"] != "http.disconnect":
            pass

    def total_usage(usages, n):
        """Of the choices, n per prompt: each prompt counts once."""
        prompt = sum(u.get("prompt_tokens", 0) for u in usages[::n])
        completion = sum(u.get("completion_tokens", 0) for u in usages)
        # Prompt tokens the prefix cache held, so only the rest was prefilled.
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(u.get("cached_tokens", 0) for u in usages[::n])}}

    def chat_logprobs(entries) -> dict:
        """OpenAI's chat shape of scheduler.token_logprobs entries."""
        def one(token, logprob):
            text = tokenizer.decode([token])
            return {"token": text, "logprob": max(logprob, LOGPROB_FLOOR), "bytes": list(text.encode())}
        return {"content": [{**one(t, lp), "top_logprobs": [one(*a) for a in top]} for t, lp, top, _ in entries]}

    def text_logprobs(entries) -> dict:
        """The completions API's (legacy) shape."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, logprob, top, offset in entries:
            out["tokens"].append(tokenizer.decode([token]))
            out["token_logprobs"].append(max(logprob, LOGPROB_FLOOR))
            # The chosen token is always there, beside the most likely ones
            # (tokens that read the same, such as parts of a character, keep the best).
            alternatives = {}
            for t, lp in top + [(token, logprob)]:
                alternatives.setdefault(tokenizer.decode([t]), max(lp, LOGPROB_FLOOR))
            out["top_logprobs"].append(alternatives)
            out["text_offset"].append(offset)
        return out

    def respond(req: Sampling, jobs: List[Job], kind: str, request: Request, outputs=None):
        """The response of a chat (`outputs`: a ChatOutput per job) or a
        completions request (a choice per job, n per prompt), whole or streamed."""
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        obj = "chat.completion" if kind == "chat" else "text_completion"
        now = int(time.time())
        logprobs = jobs[0].logprobs is not None
        streams = merged(start_all(jobs))
        if not req.stream:
            async def collect():
                texts, entries = [[] for _ in jobs], [[] for _ in jobs]
                choices, usages = [None] * len(jobs), [{}] * len(jobs)
                async with aclosing(streams):  # an error ends the other choices' jobs now
                    async for i, event in streams:
                        if event[0] == "text":
                            if kind == "chat":
                                outputs[i].feed(event[1])
                            else:
                                texts[i].append(event[1])
                            if logprobs:
                                entries[i] += event[2]
                        elif event[0] == "error":
                            raise APIError(503 if engine.failure else 500, event[1], type="server_error")
                        else:
                            usages[i] = event[2]
                            if kind == "chat":
                                _, finish = outputs[i].finish(event[1])
                                choices[i] = {"index": i, "message": outputs[i].message(), "finish_reason": finish,
                                              "logprobs": chat_logprobs(entries[i]) if logprobs else None}
                            else:
                                choices[i] = {"index": i, "text": "".join(texts[i]), "finish_reason": event[1],
                                              "logprobs": text_logprobs(entries[i]) if logprobs else None}
                return {"id": rid, "object": obj, "created": now, "model": req.model,
                        "choices": choices, "usage": total_usage(usages, req.n)}

            async def whole():
                # A client that leaves before the answer frees its place.
                answer = asyncio.ensure_future(collect())
                gone = asyncio.ensure_future(until_disconnected(request))
                await asyncio.wait((answer, gone), return_when=asyncio.FIRST_COMPLETED)
                gone.cancel()
                if answer.done():
                    return answer.result()
                answer.cancel()
                await asyncio.gather(answer, return_exceptions=True)
                return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
            return whole()

        chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def sse():
            def chunk(choices, **extra):
                data = {"id": rid, "object": chunk_obj, "created": now, "model": req.model,
                        "choices": choices, **extra}
                return f"data: {json.dumps(data)}\n\n"

            pending = [[] for _ in jobs]  # log-probs of tokens whose text the ChatOutput holds back

            def chat_chunks(i, deltas, finish=None):
                choices = [{"index": i, "delta": d, "finish_reason": None} for d in deltas]
                if finish:
                    choices.append({"index": i, "delta": {}, "finish_reason": finish})
                for c in choices if logprobs else ():  # the first chunk takes those held back
                    c["logprobs"], pending[i] = (chat_logprobs(pending[i]) if pending[i] else None), []
                return [chunk([c]) for c in choices]

            if kind == "chat":
                for i in range(len(jobs)):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            usages = [{}] * len(jobs)
            async with aclosing(streams):
                async for i, event in streams:
                    if event[0] == "error":
                        yield f"data: {json.dumps(error_body(event[1], type='server_error'))}\n\n"
                        break
                    if event[0] == "text" and logprobs:
                        pending[i] += event[2]
                    if kind == "chat":
                        if event[0] == "text":
                            pieces = chat_chunks(i, outputs[i].feed(event[1]))
                        else:
                            pieces = chat_chunks(i, *outputs[i].finish(event[1]))
                    else:
                        finish = None if event[0] == "text" else event[1]
                        text = event[1] if event[0] == "text" else ""
                        lp = text_logprobs(pending[i]) if logprobs and pending[i] else None
                        pending[i] = []
                        pieces = [chunk([{"index": i, "text": text, "finish_reason": finish, "logprobs": lp}])]
                    for piece in pieces:
                        yield piece
                    if event[0] == "done":
                        usages[i] = event[2]
                else:
                    if include_usage:
                        yield chunk([], usage=total_usage(usages, req.n))
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    def chat_prompt(req: ChatRequest):
        try:
            return build_prompt(tokenizer, req, engine.grammars)
        except RequestError as e:
            raise APIError(400, str(e), param=e.param) from e

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        prompt = await run_in_threadpool(chat_prompt, req)  # templating, and compiling a grammar, take time
        job = prepare(req, prompt.ids)
        job.grammar = prompt.grammar
        jobs = choices(req, job)
        out = respond(req, jobs, "chat", request, [ChatOutput(tokenizer, prompt.ids, prompt.tools) for _ in jobs])
        return await out if not req.stream else out

    def prompts(prompt) -> List[List[int]]:
        if isinstance(prompt, str):
            return [encode(tokenizer, prompt)]
        if prompt and all(isinstance(p, int) for p in prompt):
            ids = [prompt]
        else:
            ids = [encode(tokenizer, p) if isinstance(p, str) else p for p in prompt]
        if not ids:
            raise APIError(400, "The prompt list is empty.", param="prompt", code="empty_prompt")
        for i, p in enumerate(ids):
            if any(not 0 <= t < vocab_size for t in p):
                raise APIError(400, f"prompt {i} has a token id outside the vocabulary (0 to {vocab_size - 1}).",
                               param="prompt")
        return ids

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        jobs = [job for ids in prompts(req.prompt) for job in choices(req, prepare(req, ids))]
        out = respond(req, jobs, "text", request)
        return await out if not req.stream else out

    async def run_generation(gen: Generation):
        """anthropic_router's runner: the same checks and engine as the OpenAI endpoints."""
        req = Sampling(model=gen.model, max_tokens=gen.max_tokens, temperature=gen.temperature,
                       top_p=gen.top_p, top_k=gen.top_k or 0, stop=gen.stop)
        job = prepare(req, gen.prompt)
        job.grammar = gen.grammar
        stream = start(job)
        async with aclosing(stream):
            async for event in stream:
                yield event

    app.include_router(anthropic_router(tokenizer, run_generation, engine.grammars))
    # GET /, /v1/status and /health; after Metrics: it chains engine.on_step. `cluster()`: hosts and memory per rank.
    app.include_router(status_router(engine, model_id, cluster))

    metrics.paths = set(route_paths(app.routes))
    return app

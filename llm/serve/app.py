"""The OpenAI-compatible HTTP app: chat completions, completions, models, health, metrics, tokenizer endpoints.

    app = create_app(lambda: load_release(path), model_name="tiny", tools=True, api_key=None)

The engine sits behind `worker.Worker` (the one seam a scheduler replaces); each request
is a `worker.Job` whose tokens arrive on an asyncio queue and are turned into text by
`stream.TextDeltas`. Behaviour follows the OpenAI API reference, with vLLM's where OpenAI
says nothing: `/health` is 503 until the model is loaded and warmed up, a full queue is
429 with `Retry-After`, an error after a stream began is a `data: {"error": ...}` event,
and lm-evaluation-harness's remote tokenizer (`/tokenizer_info`, `/tokenize`,
`/detokenize`) is served at the root.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from typing import Any, AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llm.generate import Sample, SamplingParams, engine_for
from llm.serve import responses as R
from llm.serve.metrics import Metrics
from llm.serve.protocol import (APIError, ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                                validation_message)
from llm.serve.scoring import score_tokens
from llm.serve.plans import Plan, Served, check_ids, check_prompt, completion_prompts, make_plan, tokenize_text
from llm.serve.stream import TextDeltas
from llm.serve.worker import Job, QueueFull, Worker

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the room left in the context


def create_app(load: Callable[[], tuple[Any, Any, Any]], *, model_name: str, tools: bool = False,
               api_key: str | None = None, max_slots: int = 8, max_queue: int = 64,
               make_engine: Callable[..., Any] = engine_for) -> FastAPI:
    """The app; `load()` gives (cfg, params, tokenizer) and runs on the worker thread, so /health answers meanwhile."""
    metrics = Metrics()
    state: dict[str, Served] = {}

    def setup():
        cfg, params, tokenizer = load()
        engine = make_engine(cfg, params, tokenizer, tools)
        names = ("python",) if tools and tokenizer.has_tool("python") else ()  # engine_for's rule
        first = tokenizer.prompt_start or [tokenizer.eot]
        engine.generate([first], SamplingParams(max_new_tokens=2, temperature=0.0))  # compile before /health is 200
        score_tokens(cfg, params, [*first, *first], top=1)
        state["served"] = Served(model_name, cfg, params, tokenizer, engine, names)
        return engine

    worker = Worker(setup, metrics, max_slots=max_slots, max_queue=max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        worker.start()
        yield
        worker.close()

    app = FastAPI(title="llm", lifespan=lifespan)
    app.state.worker, app.state.metrics = worker, metrics

    @app.exception_handler(APIError)
    async def _api_error(_, error: APIError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, error: RequestValidationError):
        message, param = validation_message(error.errors())
        return APIError(400, message, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, error: StarletteHTTPException):
        return APIError(error.status_code, str(error.detail)).response()

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")

    def served() -> Served:
        if worker.state != "ready":
            raise APIError(503, f"the model is {worker.state}" + (f": {worker.error}" if worker.error else ""))
        return state["served"]

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}", "model",
                           "model_not_found")

    @app.get("/health")
    async def health():
        if worker.state != "ready":
            return JSONResponse({"status": worker.state, "error": worker.error}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "llm"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(body: ChatRequest, request: Request):
        s = served()
        check_model(body.model)
        if body.logprobs:
            raise APIError(400, "logprobs are not supported for chat completions; use /v1/completions", "logprobs")
        if s.tokenizer.chat_template is None:
            raise APIError(400, f"{model_name} has no chat format; use /v1/completions", "messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:  # user text is encoded as ordinary text: typing <|im_end|> cannot forge the token
            prompt = s.tokenizer.render_for_completion(messages)
        except (ValueError, TypeError) as error:
            raise APIError(400, str(error), "messages") from None
        check_prompt(s, prompt, "messages")
        limit = body.limit()
        # Without a limit, the context's: the engine stops each row at the context anyway, and one default for
        # every prompt length lets such requests share an engine call (the budget is part of the batch key).
        plan = make_plan(s, body, [prompt], s.cfg.max_seq_len if limit is None else limit,
                         s.tokenizer.chat_stop_ids, max_slots)
        head = R.envelope("chat.completion.chunk" if body.stream else "chat.completion", R.new_id("chatcmpl"),
                          model_name)
        if body.stream:
            return await stream(s, plan, head, body, chat=True)
        samples, completion = await run(s, plan, request)
        choices = [R.chat_choice(k, plan.text(s.tokenizer, sample), sample.finish_reason)
                   for k, sample in enumerate(samples[0])]
        return {**head, "choices": choices, "usage": R.usage(plan.prompts, completion)}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request):
        s = served()
        check_model(body.model)
        prompts = completion_prompts(s, body.prompt)
        limit = COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        for prompt in prompts:
            check_prompt(s, prompt, "prompt", scoring_only=limit == 0)
        plan = make_plan(s, body, prompts, limit, (s.tokenizer.eot,), max_slots)
        head = R.envelope("text_completion", R.new_id("cmpl"), model_name)
        if body.stream:
            if body.echo or body.logprobs is not None:
                raise APIError(400, "echo and logprobs are not supported with stream", "stream")
            return await stream(s, plan, head, body, chat=False)
        samples, completion = await run(s, plan, request)
        pairs = [(prompt, sample) for prompt, row in zip(prompts, samples) for sample in row]
        logprobs = [None] * len(pairs)
        if body.logprobs is not None:
            logprobs = await completion_logprobs(s, pairs, body.echo, body.logprobs)
        choices = []
        for k, ((prompt, sample), lp) in enumerate(zip(pairs, logprobs)):
            text = plan.text(s.tokenizer, sample)
            text = s.tokenizer.decode(prompt) + text if body.echo else text
            choices.append(R.completion_choice(k, text, sample.finish_reason, lp))  # k = prompt index * n + sample
        return {**head, "choices": choices, "usage": R.usage(prompts, completion)}

    @app.get("/tokenizer_info", dependencies=[Depends(authorized)])
    async def tokenizer_info():
        """vLLM's `/tokenizer_info`, what lm-evaluation-harness's remote tokenizer reads (eos, bos, template)."""
        s = served()
        tok = s.tokenizer
        eos = tok.decode([tok.eot])
        return {"tokenizer_class": "tiktoken", "name": tok.name, "eos_token": eos,
                "bos_token": tok.decode(tok.bos) if tok.bos else None, "pad_token": eos,
                "model_max_length": s.cfg.max_seq_len, "vocab_size": tok.n_vocab,
                "chat_template": tok.chat_template.to_jinja() if tok.chat_template is not None else None}

    @app.post("/tokenize", dependencies=[Depends(authorized)])
    async def tokenize(body: TokenizeRequest):
        s = served()
        tokens = tokenize_text(s.tokenizer, body.prompt, body.add_special_tokens)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": s.cfg.max_seq_len}

    @app.post("/detokenize", dependencies=[Depends(authorized)])
    async def detokenize(body: DetokenizeRequest):
        s = served()
        check_ids(s, body.tokens, "tokens")
        return {"prompt": s.tokenizer.decode(body.tokens)}

    async def submit(job: Job) -> None:
        try:
            worker.submit(job)
        except QueueFull as full:
            raise APIError(429, f"server busy: {full}; retry later", code="queue_full",
                           headers={"Retry-After": "1"}) from None

    async def run(s: Served, plan: Plan, request: Request) -> tuple[list[list[Sample]], int]:
        """The samples of every prompt (waiting for the worker), and how many tokens they hold."""
        if plan.sampling is None:
            return [[Sample([], [], [], "length")] * plan.n for _ in plan.prompts], 0
        job = plan.job(asyncio.get_running_loop())
        await submit(job)
        outcome, gone = asyncio.ensure_future(last_event(job)), asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait({outcome, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not outcome.done():  # the client went away first: stop feeding its job
            outcome.cancel()
            job.cancel()
            metrics.cancelled.inc()
            raise APIError(499, "the client closed the request")  # nginx's status; nobody reads it
        kind, result = outcome.result()
        metrics.requests.labels(kind).inc()
        if kind == "error":
            raise APIError(500, result)
        return result, sum(len(x.tokens) for row in result for x in row)

    async def completion_logprobs(s: Served, pairs: list[tuple[list[int], Sample]], echo: bool, top: int
                                  ) -> list[dict]:
        """Each completion's log-probabilities (with echo, its prompt's too): one job of forwards on the worker."""
        # The stop token is listed too (vLLM does): lm-eval's loglikelihood drops exactly one generated entry.
        rows = [[*prompt, *sample.tokens] for prompt, sample in pairs]
        job = Job(asyncio.get_running_loop(), call=lambda _: [score_tokens(s.cfg, s.params, r, top) for r in rows])
        worker.submit(job, admitted=True)  # the request is in already: its second half is never refused
        kind, result = await last_event(job)
        if kind == "error":
            raise APIError(500, result)
        objects = []
        for (prompt, _), tokens, (values, tops) in zip(pairs, rows, result):
            start = 0 if echo else len(prompt)
            objects.append(R.logprobs_object(s.tokenizer, tokens[start:], values[start:],
                                             tops[start:] if top else None))
        return objects

    async def stream(s: Served, plan: Plan, head: dict, body, chat: bool) -> StreamingResponse:
        """Admits the job first, so a full queue is a 429 before any byte of the stream is sent."""
        job = plan.job(asyncio.get_running_loop()) if plan.sampling else None
        if job is not None:
            await submit(job)
        return StreamingResponse(events(s, plan, job, head, body, chat), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def events(s: Served, plan: Plan, job: Job | None, head: dict, body, chat: bool) -> AsyncIterator[str]:
        """The SSE stream; a client that goes away cancels the job (counted in llm_requests_cancelled)."""
        n = body.n
        with_usage = bool(body.stream_options and body.stream_options.include_usage)
        deltas = {(i, j): TextDeltas(s.tokenizer, plan.sampling.stop_strings if plan.sampling else (), plan.hide,
                                     plan.shown) for i in range(len(plan.prompts)) for j in range(n)}

        def chunk(i: int, j: int, text: str | None = None, role: bool = False, finish: str | None = None) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                return R.sse(R.chat_chunk(head, i * n + j, delta, finish, with_usage))
            return R.sse(R.completion_chunk(head, i * n + j, text or "", finish, with_usage))

        finished = False
        try:
            if chat:
                for i, j in deltas:
                    yield chunk(i, j, role=True)
            if job is None:
                samples = [[Sample([], [], [], "length")] * n for _ in plan.prompts]
            else:
                while True:
                    event = await job.events.get()
                    if event[0] == "token":
                        _, i, j, token = event
                        if text := deltas[i, j].push(token):
                            yield chunk(i, j, text)
                    elif event[0] == "error":
                        metrics.requests.labels("error").inc()
                        finished = True
                        yield R.sse(APIError(500, event[1]).body())
                        yield R.sse("[DONE]")
                        return
                    else:
                        samples = event[1]
                        break
            for i, row in enumerate(samples):
                for j, sample in enumerate(row):
                    if rest := deltas[i, j].finish(plan.text(s.tokenizer, sample)):
                        yield chunk(i, j, rest)
                    yield chunk(i, j, finish=sample.finish_reason)
            if with_usage:
                completion = sum(len(x.tokens) for row in samples for x in row)
                yield R.sse(R.usage_chunk(head, R.usage(plan.prompts, completion)))
            metrics.requests.labels("done").inc()
            finished = True
            yield R.sse("[DONE]")
        finally:
            if not finished and job is not None:
                job.cancel()
                metrics.cancelled.inc()

    return app


async def last_event(job: Job) -> tuple[str, Any]:
    """("done", samples) or ("error", message): a whole reply's outcome; its tokens are not needed."""
    while (event := await job.events.get())[0] == "token":
        pass
    return event


async def disconnected(request: Request) -> None:
    """Returns when the client has gone (Starlette's own listen_for_disconnect, for a reply not yet begun)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass

"""An OpenAI-compatible server for any dlmjax model, with dynamic batching and streaming.

    pip install -e ".[serve]"
    python -m dlmjax.serve --model tiny-llada --method fast-dllm --threshold 0.9 --port 8000

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="tiny-llada", messages=[{"role": "user", "content": "Sort: 7 3 9 1"}])
    client.completions.create(model="tiny-llada", prompt="...", stream=True, extra_body={"threshold": 0.8})

Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`. Every
`lm.generate` knob is a server flag (the default of every request) and a request field (the
openai client's `extra_body`; `method` too). `max_tokens` sets the canvas: rounded up to a
multiple of the block length (32 unless the request names one), the answer cut at `max_tokens`
tokens. `temperature` and `top_p` go to the method where it has them (OpenAI's defaults are not
sent by the client; absent, the method's own apply); `seed` seeds the decode; `stop` strings cut
the text after decoding (the decode itself stops at the model's stop tokens). `n` > 1, `logprobs`,
`echo`, penalties and tools are refused with a 400 naming the field; malformed JSON is a 400, an
unknown model a 404, a prompt over the context a 413, and a full queue (`--max-queue`) a 429.

`stream=true` answers with server-sent events, one chunk per completed block of the answer
(`lm.stream`), then `data: [DONE]`. Responses carry `"dlmjax": {"nfe", "passes", "batch"}` besides
OpenAI's fields.

Dynamic batching: requests wait in one queue; a worker thread takes the oldest, waits up to
`--batch-wait-ms` for more requests with the same decode settings (method, knobs, canvas), and
decodes up to `--max-batch` of them together in one `lm.generate` / `lm.stream` call. The batch is
padded to a power of two (with copies of its first row) so that only a few shapes compile; each
row stops on its own as in any batch. Each prompt is tokenized and checked when its request
arrives, so one bad prompt is a 400 for its own request only.
"""


import argparse
import asyncio
import dataclasses
import json
import sys
import threading
import time
import uuid
from typing import Any

from dlmjax.errors import DlmjaxError, PromptTooLong

OPENAI_FIELDS = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
                 "stream", "stream_options", "stop", "n", "user"}
REFUSED = {  # OpenAI fields a diffusion decode cannot honour: refused unless left at their default
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "best_of": (None, 1), "suffix": (None,),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "response_format": (None,),
}


class Busy(DlmjaxError):
    """The queue is full (HTTP 429)."""


@dataclasses.dataclass
class Job:
    """One request: its prompt ids, its decode settings and where its results go."""

    key: tuple  # decode settings: requests batch together only when these are equal
    ids: list[int]
    settings: dict
    max_tokens: int | None
    stream: bool
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue

    def send(self, item) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class Batcher:
    """The queue and the worker thread that decodes compatible requests together."""

    def __init__(self, lm, *, max_batch: int = 32, wait_s: float = 0.005, max_queue: int = 1024):
        self.lm, self.max_batch, self.wait_s, self.max_queue = lm, max_batch, wait_s, max_queue
        self._jobs: list[Job] = []
        self._cv = threading.Condition()
        self._stop = False
        self.batches: list[int] = []  # the real rows of every batch decoded (for tests and stats)
        self._thread = threading.Thread(target=self._loop, name="dlmjax-serve-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cv:
            if len(self._jobs) >= self.max_queue:
                raise Busy(f"{len(self._jobs)} requests are waiting (--max-queue {self.max_queue}); retry shortly")
            self._jobs.append(job)
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()

    def _take(self) -> list[Job] | None:
        with self._cv:
            while not self._jobs and not self._stop:
                self._cv.wait()
            if self._stop:
                return None
            key = self._jobs[0].key
            deadline = time.monotonic() + self.wait_s
            while True:
                same = sum(j.key == key for j in self._jobs)
                left = deadline - time.monotonic()
                if same >= self.max_batch or left <= 0:
                    break
                self._cv.wait(left)
            batch, rest = [], []
            for j in self._jobs:
                (batch if j.key == key and len(batch) < self.max_batch else rest).append(j)
            self._jobs = rest
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._run(batch)
            except DlmjaxError as e:
                for j in batch:
                    j.send(("error", str(e)))
            except Exception as e:  # noqa: BLE001 (reported to the clients, the server goes on)
                for j in batch:
                    j.send(("error", f"{type(e).__name__}: {e}"))

    def _run(self, batch: list[Job]) -> None:
        self.batches.append(len(batch))
        rows = [j.ids for j in batch]
        size = 1
        while size < len(rows):
            size *= 2
        rows += [rows[0]] * (min(size, max(self.max_batch, len(rows))) - len(rows))
        settings = batch[0].settings
        if any(j.stream for j in batch):
            sent = [""] * len(batch)
            for update in self.lm.stream(rows, **settings):
                if update.final:
                    break
                for i, j in enumerate(batch):
                    if not j.stream:
                        continue
                    text = _cut(self.lm, update.tokens[i], j.max_tokens)
                    if text.startswith(sent[i]) and len(text) > len(sent[i]):
                        j.send(("delta", text[len(sent[i]):]))
                        sent[i] = text
            out = update.output
        else:
            out = self.lm.generate(rows, **settings)
        for i, j in enumerate(batch):
            j.send(("done", _result(self.lm, out, i, j, len(batch))))


def _cut(lm, tokens: list[int], max_tokens: int | None) -> str:
    from dlmjax.decode.api import decode_text

    return decode_text(lm, tokens[:max_tokens] if max_tokens is not None else tokens)


def _result(lm, out, i: int, job: Job, batch: int) -> dict:
    from dlmjax.decode.api import decode_text, resolve_stops

    length = int(out.lengths[i])
    tokens = [int(t) for t in out.tokens[i][:length]]
    stopped = bool(tokens) and tokens[-1] in resolve_stops(lm.config, None)  # lengths end at the first stop
    if job.max_tokens is not None and len(tokens) > job.max_tokens:
        tokens, stopped = tokens[: job.max_tokens], False
    text = decode_text(lm, tokens)
    return dict(text=text, finish_reason="stop" if stopped else "length", completion_tokens=len(tokens),
                prompt_tokens=len(job.ids), nfe=int(out.nfe[i]), passes=int(out.steps), batch=batch)


def _apply_stop(text: str, stop) -> tuple[str, bool]:
    if stop is None:
        return text, False
    stops = [stop] if isinstance(stop, str) else list(stop)
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class Server:
    """The request handling behind the app: checks, settings, and the batcher."""

    def __init__(self, lm, *, name: str, defaults: dict, max_batch: int, wait_s: float, max_queue: int = 1024):
        from dlmjax.generate import knob_flags

        self.lm, self.name, self.defaults = lm, name, dict(defaults)
        self.knobs = set(knob_flags()) | {"method"}
        self.batcher = Batcher(lm, max_batch=max_batch, wait_s=wait_s, max_queue=max_queue)
        self.created = int(time.time())

    def settings(self, body: dict, *, chat: bool) -> tuple[list[int], dict, int | None]:
        """(prompt ids, lm.generate settings, max_tokens) of a request; DlmjaxError if it cannot work
        (PromptTooLong for a prompt over the context)."""
        from dlmjax.decode.api import _prompts_that_fit, build_method

        unknown = sorted(k for k in body if k not in OPENAI_FIELDS and k not in self.knobs and k not in REFUSED)
        if unknown:
            import difflib

            close = difflib.get_close_matches(unknown[0], sorted(self.knobs | OPENAI_FIELDS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DlmjaxError(f"unknown field {unknown[0]!r}{hint}; decode knobs are {', '.join(sorted(self.knobs))}")
        for field, defaults in REFUSED.items():
            if field in body and body[field] not in defaults:
                raise DlmjaxError(f"{field} is not supported by a diffusion decode; leave it out")
        if body.get("n", 1) != 1:
            raise DlmjaxError(f"n={body['n']}: one choice per request; send several requests (they batch together)")
        knobs = {**self.defaults, **{k: v for k, v in body.items() if k in self.knobs and v is not None}}
        if "seed" in body and body["seed"] is not None:
            knobs["seed"] = int(body["seed"])
        for field in ("temperature", "top_p"):
            if body.get(field) is not None:
                knobs[field] = body[field]
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        if max_tokens is not None:
            if not isinstance(max_tokens, int) or max_tokens < 1:
                raise DlmjaxError(f"max_tokens={max_tokens!r} must be a positive integer")
            unit = int(knobs.get("block_length") or 32)
            knobs["gen_length"] = -(-max_tokens // unit) * unit
        knobs.setdefault("gen_length", self.lm.default_gen_length)
        if self.lm.config.is_autoregressive:
            knobs.setdefault("method", "ar")
        else:
            method = knobs.get("method") or "llada"
            plain = {k: v for k, v in knobs.items() if k not in ("method", "gen_length", "seed")}
            build_method(method, gen_length=knobs["gen_length"], **plain).check()  # one-line errors, nothing compiled
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise DlmjaxError("messages must be a non-empty list of {'role': ..., 'content': ...}")
            if not all(isinstance(m, dict) and isinstance(m.get("content") or "", str) for m in messages):
                raise DlmjaxError("messages must be a non-empty list of {'role': ..., 'content': text}")
            from dlmjax.tokenizer import check_vocabulary

            contents = [m.get("content") or "" for m in messages]
            check_vocabulary(self.lm.tokenizer, contents, self.lm.directory / "hf" if self.lm.directory is not None else None)
            ids = list(self.lm.apply_chat_template([{"role": m.get("role"), "content": c} for m, c in zip(messages, contents)]))
            _prompts_that_fit(self.lm, [ids], None, False, knobs["gen_length"])
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                ids = [int(t) for t in prompt]
                _prompts_that_fit(self.lm, [ids], None, False, knobs["gen_length"])
            elif isinstance(prompt, str):
                array, mask, _ = _prompts_that_fit(self.lm, prompt, None, False, knobs["gen_length"])
                ids = [int(t) for t, m in zip(array[0], mask[0]) if m]
            else:
                raise DlmjaxError("prompt must be one string or one list of token ids (one prompt per request)")
        return ids, knobs, max_tokens

    async def run(self, body: dict, *, chat: bool):
        ids, knobs, max_tokens = self.settings(body, chat=chat)
        key = tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in knobs.items()))
        loop = asyncio.get_running_loop()
        job = Job(key=key, ids=ids, settings=knobs, max_tokens=max_tokens, stream=bool(body.get("stream")), loop=loop,
                  out=asyncio.Queue())
        self.batcher.submit(job)
        return job


def _chunk(kind: str, rid: str, created: int, model: str, text: str | None, finish, *, first=False) -> dict:
    if kind == "chat":
        delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def build_app(lm, *, name: str, defaults: dict | None = None, max_batch: int = 32, wait_s: float = 0.005,
              max_queue: int = 1024):
    """The FastAPI app serving `lm` under the model name `name` (FastAPI and uvicorn: the `serve` extra)."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, StreamingResponse
    except ImportError:
        raise DlmjaxError('the server needs FastAPI and uvicorn: pip install -e ".[serve]"') from None
    import contextlib

    server = Server(lm, name=name, defaults=defaults or {}, max_batch=max_batch, wait_s=wait_s, max_queue=max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.batcher.close()

    app = FastAPI(title="dlmjax", lifespan=lifespan)
    app.state.server = server

    def error(message: str, status: int = 400, kind: str = "invalid_request_error"):
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status_code=status)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": server.created, "owned_by": "dlmjax"}]}

    async def handle(request: Request, kind: str):
        try:
            body = await request.json()
        except ValueError:
            return error("the request body is not JSON")
        if not isinstance(body, dict):
            return error("the request body must be a JSON object")
        if body.get("model") not in (None, name):
            return error(f"model {body.get('model')!r} is not served here; this server serves {name!r}", 404, "not_found")
        try:
            job = await server.run(body, chat=kind == "chat")
        except PromptTooLong as e:
            return error(str(e), 413)
        except Busy as e:
            return error(str(e), 429, "rate_limit_error")
        except DlmjaxError as e:
            return error(str(e))
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        stop = body.get("stop")
        if not job.stream:
            item = await job.out.get()
            if item[0] == "error":
                return error(item[1])
            return _response(kind, rid, created, name, item[1], stop)

        async def events():
            first, full, shown = True, "", ""
            while True:
                item = await job.out.get()
                if item[0] == "error":
                    yield f"data: {json.dumps({'error': {'message': item[1], 'type': 'server_error'}})}\n\n"
                    break
                if item[0] == "delta":
                    full += item[1]
                    text, cut = _apply_stop(full, stop)
                    new = text[len(shown):] if text.startswith(shown) else ""
                    if new:
                        yield f"data: {json.dumps(_chunk(kind, rid, created, name, new, None, first=first))}\n\n"
                        first, shown = False, text
                    continue
                result = item[1]
                text, cut = _apply_stop(result["text"], stop)
                new = text[len(shown):] if text.startswith(shown) else ""
                finish = "stop" if cut else result["finish_reason"]
                final = _chunk(kind, rid, created, name, new, finish, first=first)
                final["dlmjax"] = {k: result[k] for k in ("nfe", "passes", "batch")}
                final["usage"] = _usage(result)
                yield f"data: {json.dumps(final)}\n\n"
                break
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "text")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, "chat")

    return app


def _usage(result: dict) -> dict:
    return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
            "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}


def _response(kind: str, rid: str, created: int, model: str, result: dict, stop) -> dict:
    text, cut = _apply_stop(result["text"], stop)
    finish = "stop" if cut else result["finish_reason"]
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice], "usage": _usage(result),
            "dlmjax": {k: result[k] for k in ("nfe", "passes", "batch")}}


def _parser() -> argparse.ArgumentParser:
    from dlmjax.generate import add_knob_flags

    p = argparse.ArgumentParser(prog="python -m dlmjax.serve", description="An OpenAI-compatible dlmjax server.")
    p.add_argument("--model", default="tiny-llada", help="embedded name, local directory or Hugging Face id")
    p.add_argument("--name", help="the model name clients use (default: --model)")
    p.add_argument("--adapter", help="a LoRA adapter directory or id to load onto the model")
    p.add_argument("--method", help="the default method of requests (default llada, or ar for AR models)")
    add_knob_flags(p)
    p.add_argument("--dtype", choices=("bfloat16", "float32"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32, help="the most requests decoded together")
    p.add_argument("--max-queue", type=int, default=1024, help="requests that may wait; more get HTTP 429")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long the oldest waiting request waits for others to share its batch")
    return p


def main(argv: list[str] | None = None) -> int:
    from dlmjax.generate import knob_flags

    args = _parser().parse_args(argv)
    try:
        if args.max_batch < 1:
            raise DlmjaxError(f"--max-batch {args.max_batch} must be at least 1")
        if args.max_queue < 0:
            raise DlmjaxError(f"--max-queue {args.max_queue} must not be negative")
        if args.batch_wait_ms < 0:
            raise DlmjaxError(f"--batch-wait-ms {args.batch_wait_ms} must not be negative")
        try:
            import uvicorn
        except ImportError:
            raise DlmjaxError('the server needs FastAPI and uvicorn: pip install -e ".[serve]"') from None
        import dlmjax

        lm = dlmjax.load(args.model, dtype=args.dtype, adapter=args.adapter)
        defaults: dict[str, Any] = {k: getattr(args, k) for k in knob_flags() if getattr(args, k) is not None}
        if args.method:
            defaults["method"] = args.method
        app = build_app(lm, name=args.name or args.model, defaults=defaults, max_batch=args.max_batch,
                        wait_s=args.batch_wait_ms / 1e3, max_queue=args.max_queue)
        if not lm.config.is_autoregressive:  # the defaults must make a method: checked before serving
            app.state.server.settings({"prompt": [0]}, chat=False)
    except DlmjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"serving {args.name or args.model} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The OpenAI-compatible server (`python -m dlmjax.serve`), driven by the official `openai` client
against a server this module starts on loopback, serving the embedded tiny-llada."""

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import dlmjax  # noqa: E402

KNOBS = dict(method="fast-dllm", threshold=0.9, block_length=8)
FLAGS = ["--method", "fast-dllm", "--threshold", "0.9", "--block-length", "8"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dlmjax.serve", "--model", "tiny-llada", *FLAGS, "--port", str(port),
                             "--batch-wait-ms", "200"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(base + "/models", timeout=2) as r:
                models = json.loads(r.read())
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"the server did not start: {proc.stderr.read()[-2000:]}")
            time.sleep(0.5)
    yield base, models
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def lm():
    return dlmjax.load("tiny-llada", progress=False)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key="none", max_retries=0, timeout=300)


def _sort_prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return ["Sort: " + " ".join(str(int(v)) for v in rng.integers(1, 10, size=int(rng.integers(3, 7)))) for _ in range(n)]


def test_models_and_plain_and_streamed_answers(server, client, lm):
    """/v1/models names the model; a chat answer and a streamed one equal lm.generate's text, the
    stream comes in more than one chunk (blocks) and ends with finish_reason and usage."""
    assert [m["id"] for m in server[1]["data"]] == ["tiny-llada"]
    prompt = "Sort: 7 3 9 1 4 2"
    want = lm.generate([prompt], chat=True, **KNOBS)
    messages = [{"role": "user", "content": prompt}]
    got = client.chat.completions.create(model="tiny-llada", messages=messages)
    assert got.choices[0].message.content == want.texts[0]
    assert got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens == int(want.lengths[0])
    assert got.model_extra["dlmjax"]["nfe"] == int(want.nfe[0])
    chunks = list(client.chat.completions.create(model="tiny-llada", messages=messages, stream=True))
    texts = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(texts) >= 2 and "".join(texts) == want.texts[0]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop" and all(c.choices[0].finish_reason is None for c in chunks[:-1])
    # /v1/completions on the chat-formatted ids, and a knob through extra_body
    ids = lm.apply_chat_template(messages)
    loose = lm.generate([prompt], chat=True, **dict(KNOBS, threshold=0.5))
    got = client.completions.create(model="tiny-llada", prompt=list(ids), extra_body={"threshold": 0.5})
    assert got.choices[0].text == loose.texts[0]
    assert got.model_extra["dlmjax"]["nfe"] == int(loose.nfe[0])
    streamed = client.completions.create(model="tiny-llada", prompt=list(ids), stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want.texts[0]
    # stop strings cut the text; max_tokens cuts the answer
    got = client.chat.completions.create(model="tiny-llada", messages=messages, stop=[" 4"])
    assert got.choices[0].message.content == want.texts[0].split(" 4")[0] and got.choices[0].finish_reason == "stop"
    got = client.chat.completions.create(model="tiny-llada", messages=messages, max_tokens=3)
    short = lm.generate([prompt], chat=True, gen_length=8, **KNOBS)  # the canvas: 3 rounded up to a block of 8
    assert got.choices[0].finish_reason == "length" and got.usage.completion_tokens == 3
    assert got.choices[0].message.content == lm.tokenizer.decode(short.tokens[0][:3].tolist(), skip_special_tokens=True)


def test_concurrent_clients_each_get_their_own_answer(server, client, lm):
    """32 clients at once (half of them streaming): each gets the answer lm.generate gives its
    prompt, and the server decoded them in shared batches."""
    prompts = _sort_prompts(32, seed=1)
    want = lm.generate(prompts, chat=True, **KNOBS).texts
    got = [None] * len(prompts)
    batches = [None] * len(prompts)
    errors = []

    def ask(i):
        try:
            messages = [{"role": "user", "content": prompts[i]}]
            if i % 2:
                chunks = list(client.chat.completions.create(model="tiny-llada", messages=messages, stream=True))
                got[i] = "".join(c.choices[0].delta.content or "" for c in chunks)
                batches[i] = chunks[-1].model_extra["dlmjax"]["batch"]
            else:
                r = client.chat.completions.create(model="tiny-llada", messages=messages)
                got[i], batches[i] = r.choices[0].message.content, r.model_extra["dlmjax"]["batch"]
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert got == want
    assert max(batches) > 1


def test_bad_requests_are_one_line_400s(server, client):
    """Bad fields and values are refused per request in one line naming the fix; a prompt the
    model cannot read fails alone while a good request beside it is answered."""
    messages = [{"role": "user", "content": "Sort: 7 3 9 1"}]
    cases = [
        (dict(extra_body={"thresold": 0.5}), "unknown field 'thresold' (did you mean 'threshold'?)"),
        (dict(n=2), "n=2: one choice per request"),
        (dict(logprobs=True), "logprobs is not supported"),
        (dict(extra_body={"threshold": 1.5}), "threshold"),
        (dict(max_tokens=0), "max_tokens=0 must be a positive integer"),
    ]
    for kwargs, message in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny-llada", messages=messages, **kwargs)
        assert message in e.value.body["message"] and "\n" not in e.value.body["message"], (kwargs, e.value.body)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4", messages=messages)
    with pytest.raises(openai.BadRequestError, match="vocabulary lacks"):
        client.chat.completions.create(model="tiny-llada", messages=[{"role": "user", "content": "Bonjour tout le monde"}])
    assert client.chat.completions.create(model="tiny-llada", messages=messages).choices[0].message.content


def test_server_flags_are_checked_before_serving():
    run = subprocess.run([sys.executable, "-m", "dlmjax.serve", "--model", "tiny-llada", "--max-batch", "0"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.startswith("error: --max-batch 0") and "Traceback" not in run.stderr
    run = subprocess.run([sys.executable, "-m", "dlmjax.serve", "--model", "tiny-llada", "--method", "llada", "--threshold", "0.9"],
                         capture_output=True, text=True)
    last = run.stderr.strip().splitlines()[-1]  # after the model's load (a progress bar on a first conversion)
    assert run.returncode == 2 and last.startswith("error: threshold does not apply to method 'llada'")
    assert "Traceback" not in run.stderr and run.stderr.count("error: ") == 1


def test_http_statuses_malformed_json_and_prompt_over_the_context(server, client):
    """Malformed JSON is a 400, a prompt longer than the model's positions a 413, each a JSON error;
    the server answers the next request."""
    request = urllib.request.Request(server[0] + "/chat/completions", data=b"{not json", method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=60)
    assert e.value.code == 400 and json.loads(e.value.read())["error"]["message"] == "the request body is not JSON"
    long = "Sort: " + " ".join(["7"] * 600)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="tiny-llada", messages=[{"role": "user", "content": long}])
    assert e.value.status_code == 413 and "exceeds the model's" in e.value.body["message"]
    ok = client.chat.completions.create(model="tiny-llada", messages=[{"role": "user", "content": "Sort: 3 1 2"}])
    assert ok.choices[0].message.content


def test_a_full_queue_is_a_429(lm):
    """With --max-queue 0 every request is refused with 429 and a JSON error (in-process app)."""
    from fastapi.testclient import TestClient

    from dlmjax.serve import build_app

    app = build_app(lm, name="tiny-llada", defaults=KNOBS, max_queue=0)
    with TestClient(app) as http:
        r = http.post("/v1/chat/completions", json={"model": "tiny-llada", "messages": [{"role": "user", "content": "Sort: 3 1 2"}]})
        assert r.status_code == 429 and "--max-queue 0" in r.json()["error"]["message"]
        assert http.get("/v1/models").status_code == 200

"""The official `openai` package, unmodified, against a real `asyncengine serve` process."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

MODEL = "tiny"
TEXT = "The quick brown fox jumps over the lazy dog."
USER = [{"role": "user", "content": "Hello world!"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError("server did not become healthy")


@pytest.fixture(scope="module")
def base_url(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "asyncengine.cli", "serve", "--model", str(llama_dir), "--port", str(port),
           "--served-model-name", MODEL, "--num-threads", "1", "--max-model-len", "512", "--num-kv-blocks", "256"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    log = tmp_path_factory.mktemp("server") / "server.log"
    with log.open("wb") as out:  # a file, not a pipe: a full pipe would stall the server
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_with_logprobs(client: openai.OpenAI) -> None:
    res = client.completions.create(model=MODEL, prompt=TEXT, max_tokens=6, logprobs=2, seed=1,
                                    extra_body={"return_token_ids": True})
    choice = res.choices[0]
    assert len(choice.logprobs.token_logprobs) == 6 and len(choice.model_extra["token_ids"]) == 6
    assert all(lp in top.values() for lp, top in zip(choice.logprobs.token_logprobs, choice.logprobs.top_logprobs))
    assert res.usage.completion_tokens == 6 and choice.finish_reason == "length"


def test_completion_stream_equals_non_stream(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, prompt=TEXT, max_tokens=10, seed=3, temperature=1.0, logprobs=1)
    full = client.completions.create(**kw).choices[0]
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[-1].usage.completion_tokens == 10
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    lps = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    assert (text, lps) == (full.text, full.logprobs.token_logprobs)


def test_chat_and_stream(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, messages=USER, max_tokens=8, seed=5, logprobs=True, top_logprobs=3)
    full = client.chat.completions.create(**kw).choices[0]
    assert full.message.role == "assistant" and len(full.logprobs.content) == 8
    assert all(len(t.top_logprobs) == 3 for t in full.logprobs.content)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    lps = [t.logprob for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert (text, lps) == (full.message.content, [t.logprob for t in full.logprobs.content])
    assert chunks[-1].choices[0].finish_reason == "length"


def test_echo_scoring(client: openai.OpenAI) -> None:
    res = client.completions.create(model=MODEL, prompt=TEXT, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = res.choices[0].logprobs
    assert res.choices[0].text == TEXT and lp.token_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])


def test_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=TEXT, temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-nope", messages=USER)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=TEXT, max_tokens=100_000)

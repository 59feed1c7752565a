"""The README's first-screen examples, copy-pasted as a reader would, against a live default server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
README_URL = "http://127.0.0.1:8000"


def _blocks(language: str, marker: str) -> list[str]:
    """The README's fenced ``language`` blocks that contain ``marker``."""
    return [b for b in re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S) if marker in b]


def _run(cmd: list[str], url: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_readme_curl_examples_answer(server) -> None:
    plain, streamed, extensions = _blocks("bash", "curl ")
    body = json.loads(_run(["bash", "-c", plain.replace(README_URL, server.url)], server.url))
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
    assert body["knn_ssd"]["verify_steps"] >= 1
    events = [line.removeprefix("data: ") for line in
              _run(["bash", "-c", streamed.replace(README_URL, server.url)], server.url).splitlines()
              if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == body["choices"][0]["message"]["content"]  # greedy: streamed = not streamed
    assert "knn_ssd" in chunks[-1]
    out, decoder = _run(["bash", "-c", extensions.replace(README_URL, server.url)], server.url), json.JSONDecoder()
    chat, end = decoder.raw_decode(out)
    embeddings, _ = decoder.raw_decode(out[end:].lstrip())
    assert chat["choices"][0]["message"]["content"] in ("positive", "negative", "neutral")
    assert [item["index"] for item in embeddings["data"]] == [0, 1]


def test_readme_sdk_example_answers(server) -> None:
    (snippet,) = _blocks("python", "OpenAI(")
    out = _run([sys.executable, "-c", snippet.replace(README_URL, server.url)], server.url).splitlines()
    at = next(i for i, line in enumerate(out) if line.startswith("{'domain'"))  # the printed knn_ssd object
    answer, streamed = "\n".join(out[:at]), "\n".join(out[at + 1:])
    assert answer.strip() and "'verify_steps'" in out[at]
    assert streamed == answer  # greedy: the stream spells the same answer

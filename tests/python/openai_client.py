"""Drives a running ttarag server with the official `openai` client. Exits non-zero on failure.

usage: openai_client.py BASE_URL MODEL_ID
"""
import sys

import openai
from openai import OpenAI

base, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base + "/v1", api_key="unused")

models = client.models.list()
assert [m.id for m in models.data] == [model], models

r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "What can damage buildings?"}],
    max_tokens=8,
    temperature=0,
    seed=3,
)
assert r.object == "chat.completion"
assert r.choices[0].message.role == "assistant"
assert isinstance(r.choices[0].message.content, str)
assert r.choices[0].finish_reason in ("stop", "length")
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
rag = r.model_extra["rag"]
assert rag["mode"] == "static" and len(rag["passages"]) >= 1, rag

stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "What can damage buildings?"}],
    max_tokens=8,
    temperature=0,
    seed=3,
    stream=True,
    stream_options={"include_usage": True},
)
pieces, usage, last = [], None, None
for chunk in stream:
    last = chunk
    if chunk.usage:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
assert "".join(pieces) == r.choices[0].message.content, (pieces, r.choices[0].message.content)
assert usage is not None and usage.completion_tokens == r.usage.completion_tokens
assert last.model_extra["rag"]["passages"] == rag["passages"]

# Extension fields travel in extra_body.
r2 = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "hello"}],
    max_tokens=4,
    extra_body={"rag": {"mode": "none"}},
)
assert r2.model_extra["rag"]["mode"] == "none" and r2.model_extra["rag"]["passages"] == []

r3 = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "What can damage buildings?"}],
    max_tokens=4,
    extra_body={"rag": {"mode": "tta", "tta": {"lr": 0.01, "steps": 2, "min_words": 3}}},
)
tta = r3.model_extra["rag"]["tta"]
assert r3.model_extra["rag"]["mode"] == "tta" and tta["scope"] == "lora" and tta["steps"] == 2, tta
assert tta["loss_after"] < tta["loss_before"], tta

try:
    client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "x"}],
        extra_body={"rag": {"collection": "missing"}},
    )
    raise SystemExit("an unknown collection must be refused")
except openai.BadRequestError as e:
    assert e.status_code == 400
    assert "missing" in e.body["message"], e.body

print("openai client: all checks passed")

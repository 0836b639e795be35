"""The official OpenAI Python SDK, unmodified, against OLLAMA_SIDECAR_URL + /v1."""

import openai
import pytest

from conftest import CHAT_MODEL, EMBED_MODEL

MESSAGES = [{"role": "user", "content": "Say hello."}]


@pytest.fixture
def client(base_url):
    # Ollama ignores the key, the SDK requires one. No retries: see the real status.
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="ollama", max_retries=0, timeout=60)


def test_chat_completion(client):
    r = client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_completion_streaming_with_usage(client):
    stream = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content.strip()
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1
    assert usage_chunks[0].choices == []
    assert usage_chunks[0].usage.completion_tokens > 0


def test_chat_completion_streaming_without_usage(client):
    chunks = list(client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, stream=True))
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_models_list(client):
    ids = [m.id for m in client.models.list()]
    assert any(i.startswith(CHAT_MODEL) for i in ids), ids
    m = client.models.retrieve(f"{CHAT_MODEL}:latest")
    assert m.id == f"{CHAT_MODEL}:latest"


def test_embeddings(client):
    r = client.embeddings.create(model=EMBED_MODEL, input=["hello", "world"])
    assert len(r.data) == 2
    assert len(r.data[0].embedding) > 0
    assert isinstance(r.data[0].embedding[0], float)
    floats = client.embeddings.create(model=EMBED_MODEL, input="hello", encoding_format="float")
    assert len(floats.data[0].embedding) == len(r.data[0].embedding)


def test_completions(client):
    r = client.completions.create(model=CHAT_MODEL, prompt="Once upon a time")
    assert r.choices[0].text


def test_bad_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model-xyz", messages=MESSAGES)
    assert e.value.status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model-xyz")

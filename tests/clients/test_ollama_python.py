"""The official ollama-python client, unmodified, against OLLAMA_SIDECAR_URL."""

import datetime
import hashlib

import httpx
import ollama
import pytest

from conftest import CHAT_MODEL, EMBED_MODEL

MESSAGES = [{"role": "user", "content": "Say hello."}]


@pytest.fixture
def client(base_url):
    return ollama.Client(host=base_url, timeout=60)


def test_chat_streaming(client):
    chunks = list(client.chat(model=CHAT_MODEL, messages=MESSAGES, stream=True))
    assert len(chunks) >= 2
    assert all(not c.done for c in chunks[:-1])
    last = chunks[-1]
    assert last.done is True
    assert last.done_reason == "stop"
    assert last.eval_count and last.eval_count > 0
    assert last.total_duration and last.total_duration > 0
    text = "".join(c.message.content or "" for c in chunks)
    assert text.strip()


def test_chat_not_streaming(client):
    r = client.chat(model=CHAT_MODEL, messages=MESSAGES)
    assert r.done is True
    assert r.message.role == "assistant"
    assert r.message.content
    assert r.prompt_eval_count and r.prompt_eval_count > 0


def test_generate(client):
    r = client.generate(model=CHAT_MODEL, prompt="Why is the sky blue?")
    assert r.done is True
    assert r.response
    parts = list(client.generate(model=CHAT_MODEL, prompt="Hi", stream=True))
    assert parts[-1].done is True
    assert "".join(p.response for p in parts) == r.response or parts[-1].eval_count


def test_embed(client):
    r = client.embed(model=EMBED_MODEL, input=["hello", "world"])
    assert len(r.embeddings) == 2
    assert len(r.embeddings[0]) > 0
    assert all(isinstance(x, float) for x in r.embeddings[0][:8])
    single = client.embed(model=EMBED_MODEL, input="hello")
    assert single.embeddings[0] == r.embeddings[0]


def test_list(client):
    names = [m.model for m in client.list().models]
    assert any(n.startswith(CHAT_MODEL) for n in names), names
    first = client.list().models[0]
    assert isinstance(first.modified_at, datetime.datetime)
    assert first.size and first.size > 0
    assert first.details and first.details.family


def test_ps(client):
    # Behind a sidecar with several instances, ps may be answered by an instance other than
    # the one that served the warm-up: try a few times (bounded).
    found = None
    for _ in range(6):
        client.generate(model=CHAT_MODEL, prompt="warm up", keep_alive="10m")
        loaded = [m for m in client.ps().models if (m.model or "").startswith(CHAT_MODEL)]
        if loaded:
            found = loaded[0]
            break
    assert found is not None, "the chat model never showed up in ps"
    assert isinstance(found.expires_at, datetime.datetime)
    assert found.size_vram is not None
    assert found.context_length


def test_show(client):
    r = client.show(CHAT_MODEL)
    assert r.modelfile
    assert r.details and r.details.family
    assert r.capabilities and "completion" in r.capabilities
    assert r.modelinfo


def _delete_everywhere(client, name, attempts=8):
    """Delete `name` until the server says it is gone (several instances may sit behind it)."""
    deleted = 0
    for _ in range(attempts):
        try:
            client.delete(name)
            deleted += 1
        except ollama.ResponseError as e:
            assert e.status_code == 404, e
    return deleted


def test_pull_streaming(client, unique_name):
    name = f"{unique_name}:latest"
    try:
        parts = list(client.pull(name, stream=True))
        statuses = [p.status for p in parts]
        assert statuses[0] == "pulling manifest"
        assert statuses[-1] == "success"
        layers = [p for p in parts if p.digest]
        assert layers and all(p.status.startswith("pulling ") for p in layers)
        assert all(p.total for p in layers)
    finally:
        _delete_everywhere(client, name)


def test_pull_not_streaming(client, unique_name):
    name = f"{unique_name}:v1"
    try:
        assert client.pull(name).status == "success"
    finally:
        _delete_everywhere(client, name)


def test_copy_then_delete(client, unique_name):
    dest = f"{unique_name}:copy"
    client.copy(CHAT_MODEL, dest)
    # The copy lives on the instance that made it; deleting it succeeds at least once.
    assert _delete_everywhere(client, dest) >= 1
    with pytest.raises(ollama.ResponseError) as e:
        client.delete(dest)
    assert e.value.status_code == 404


def test_create_blob(client, base_url, tmp_path):
    data = b"blob uploaded through the sidecar"
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    digest = client.create_blob(path)
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    # The same upload with the colon percent-encoded (some clients escape it): still a blob
    # upload for Ollama, which decodes the path before routing.
    encoded = digest.replace(":", "%3A")
    r = httpx.post(f"{base_url}/api/blobs/{encoded}", content=data, timeout=60)
    assert r.status_code in (200, 201), r.text


def test_delete_missing_is_404(client, unique_name):
    with pytest.raises(ollama.ResponseError) as e:
        client.delete(f"{unique_name}:never")
    assert e.value.status_code == 404
    assert "not found" in e.value.error


def test_bad_model_is_404(client):
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="no-such-model-xyz", messages=MESSAGES)
    assert e.value.status_code == 404
    assert "not found" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        list(client.chat(model="no-such-model-xyz", messages=MESSAGES, stream=True))
    assert e.value.status_code == 404


async def _async_chat(base_url):
    c = ollama.AsyncClient(host=base_url, timeout=60)
    text = ""
    async for part in await c.chat(model=CHAT_MODEL, messages=MESSAGES, stream=True):
        text += part.message.content or ""
    return text


def test_async_client_streaming(base_url):
    import asyncio

    assert asyncio.run(_async_chat(base_url)).strip()

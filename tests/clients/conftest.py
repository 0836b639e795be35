"""Shared fixtures: the server under test is given by OLLAMA_SIDECAR_URL.

It may be the sidecar in front of Ollama (or of mock-ollama), or mock-ollama itself.
The tests assume the default mock models are installed: llama3.2:latest, qwen2.5:0.5b,
nomic-embed-text:latest. They never modify those models (they copy, pull or create
uniquely named models and delete only those), so they are independent of order.
"""

import os
import uuid

import pytest

CHAT_MODEL = os.environ.get("OLLAMA_TEST_CHAT_MODEL", "llama3.2")
EMBED_MODEL = os.environ.get("OLLAMA_TEST_EMBED_MODEL", "nomic-embed-text")


@pytest.fixture(scope="session")
def base_url() -> str:
    url = os.environ.get("OLLAMA_SIDECAR_URL")
    if not url:
        pytest.skip("OLLAMA_SIDECAR_URL is not set (e.g. http://127.0.0.1:11434)")
    return url.rstrip("/")


@pytest.fixture
def unique_name() -> str:
    return f"clienttest-{uuid.uuid4().hex[:10]}"

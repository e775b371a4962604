"""The blocking Client against the fake server over real HTTP (uvicorn on 127.0.0.1)."""

from __future__ import annotations

import json
import tarfile
import zipfile

import pytest

from loramux.clients import (
    AdapterInfo,
    AuthenticationError,
    ChatResult,
    Client,
    GenerateResult,
    InvalidAdapterPath,
    LoramuxError,
    NotFoundError,
    RateLimitError,
    ServerError,
    ValidationError,
)
from tests.clients.fake_server import BASE_MODEL


def sent(fake, path: str) -> dict:
    """The last request the fake server got on `path`."""
    return [r for r in fake.requests if r["path"] == path][-1]


def sent_json(fake, path: str) -> dict:
    return json.loads(sent(fake, path)["body"])


def test_generate_base_and_adapter(url, fake):
    fake.add_adapter("sql")
    with Client(url) as client:
        base = client.generate("two words", max_new_tokens=2)
        tuned = client.generate("two words", adapter_id="sql", temperature=0.5, top_p=None, stop=["\n"])
    assert isinstance(base, GenerateResult)
    assert base.text == " base0 base1" and base.finish_reason == "length"
    assert base.generated_tokens == 2 and base.prompt_tokens == 2
    assert [t.text for t in base.tokens] == [" base0", " base1"] and base.tokens[0].logprob == -0.5
    assert base.request_id.startswith("req-")
    assert tuned.text == " sql0 sql1 sql2"
    body = sent_json(fake, "/generate")
    assert body == {"inputs": "two words",
                    "parameters": {"details": True, "temperature": 0.5, "stop": ["\n"], "adapter_id": "sql"}}


def test_generate_without_details(url):
    with Client(url) as client:
        result = client.generate("x", details=False)
    assert result.text == " base0 base1 base2" and result.finish_reason is None and result.tokens is None


def test_generate_stream(url, fake):
    fake.add_adapter("chat-v2")
    with Client(url) as client:
        events = list(client.generate_stream("hello there", adapter_id="chat-v2", max_new_tokens=4))
    assert "".join(e.text for e in events) == " chat-v20 chat-v21 chat-v22 chat-v23"
    assert [e.is_final for e in events] == [False, False, False, True]
    result = events[-1].result
    assert result.text == " chat-v20 chat-v21 chat-v22 chat-v23"
    assert (result.finish_reason, result.prompt_tokens, result.generated_tokens) == ("length", 2, 4)
    assert len(result.tokens) == 4 and result.request_id.startswith("req-")
    assert sent_json(fake, "/generate_stream")["parameters"]["adapter_id"] == "chat-v2"


def test_stream_error_event_after_tokens(url):
    with Client(url) as client:
        stream = client.generate_stream("fail-mid-stream")
        assert next(stream).text == " base0"
        with pytest.raises(ServerError, match="the generation failed") as caught:
            next(stream)
    assert caught.value.status_code == 424 and caught.value.request_id.startswith("req-")


def test_chat(url, fake):
    fake.add_adapter("support")
    with Client(url) as client:
        base = client.chat([{"role": "user", "content": "hi"}], max_tokens=2)
        tuned = client.chat("hi", model="support", temperature=0)
    assert isinstance(base, ChatResult)
    assert base.text == " base0 base1" and base.finish_reason == "length" and base.model == BASE_MODEL
    assert (base.usage.prompt_tokens, base.usage.completion_tokens, base.usage.total_tokens) == (5, 2, 7)
    assert tuned.text == " support0 support1 support2"
    body = sent_json(fake, "/v1/chat/completions")
    assert body == {"model": "support", "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
                    "stream": False}


def test_chat_stream(url, fake):
    with Client(url) as client:
        deltas = list(client.chat("hi", stream=True, max_tokens=3))
    assert "".join(d.text for d in deltas) == " base0 base1 base2"
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["length"]
    assert deltas[-1].usage.total_tokens == 8
    assert sent_json(fake, "/v1/chat/completions")["stream_options"] == {"include_usage": True}


def test_chat_stream_error_event(url):
    with Client(url) as client:
        with pytest.raises(ServerError, match="the generation failed"):
            list(client.chat("hi", model="fail-mid-stream", stream=True))


def test_unknown_adapter_is_not_found_in_both_families(url):
    with Client(url) as client:
        with pytest.raises(NotFoundError, match="not registered") as tgi:
            client.generate("hi", adapter_id="nope")
        with pytest.raises(NotFoundError, match="does not exist") as openai:
            client.chat("hi", model="nope")
        with pytest.raises(NotFoundError):
            list(client.generate_stream("hi", adapter_id="nope"))
    assert tgi.value.error_type == "not_found" and openai.value.error_type == "NotFoundError"


def test_forced_errors_over_http(url):
    with Client(url) as client:
        with pytest.raises(RateLimitError):
            client.generate("raise:429")
        with pytest.raises(ValidationError):
            client.chat("hi", model="raise:400")
        with pytest.raises(ServerError):
            client.chat("hi", model="raise:500", stream=True).__next__()


def test_models_and_health(url, fake):
    fake.add_adapter("a1")
    with Client(url) as client:
        models = client.models()
        assert [(m.id, m.parent) for m in models] == [(BASE_MODEL, None), ("a1", BASE_MODEL)]
        assert client.health() is True
        fake.healthy = False
        assert client.health() is False


# --------------------------------------------------------------------------- adapters


def test_upload_directory(url, fake, adapter_dir):
    with Client(url) as client:
        info = client.upload_adapter("my-adapter", adapter_dir)
    assert isinstance(info, AdapterInfo)
    assert (info.id, info.version, info.rank, info.pinned) == ("my-adapter", 1, 4, False)
    config, weights = fake.uploads["my-adapter"]
    assert weights == (adapter_dir / "adapter_model.safetensors").read_bytes()  # binary-safe
    assert config == (adapter_dir / "adapter_config.json").read_bytes()


def _zip(adapter_dir, path):
    with zipfile.ZipFile(path, "w") as archive:
        for f in adapter_dir.iterdir():
            archive.write(f, f"nested/{f.name}")
    return path


def _targz(adapter_dir, path):
    with tarfile.open(path, "w:gz") as archive:
        for f in adapter_dir.iterdir():
            archive.add(f, f"nested/{f.name}")
    return path


@pytest.mark.parametrize("make, name", [(_zip, "a.zip"), (_targz, "a.tar.gz")])
def test_upload_archive(url, fake, adapter_dir, tmp_path, make, name):
    archive = make(adapter_dir, tmp_path / name)
    with Client(url) as client:
        info = client.upload_adapter("from-archive", str(archive))
    assert info.id == "from-archive" and info.rank == 4
    assert fake.uploads["from-archive"][1] == (adapter_dir / "adapter_model.safetensors").read_bytes()
    assert name.encode() in sent(fake, "/v1/adapters")["body"]  # one file part, the archive itself


def test_upload_bad_paths_fail_before_sending(url, fake, adapter_dir, tmp_path):
    (adapter_dir / "adapter_model.safetensors").unlink()
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with Client(url) as client:
        with pytest.raises(InvalidAdapterPath, match="lacks adapter_model.safetensors"):
            client.upload_adapter("x", adapter_dir)
        with pytest.raises(InvalidAdapterPath, match="not an adapter archive"):
            client.upload_adapter("x", other)
        with pytest.raises(InvalidAdapterPath, match="does not exist"):
            client.upload_adapter("x", tmp_path / "missing")
    assert not [r for r in fake.requests if r["path"] == "/v1/adapters"]


def test_list_get_pin_unpin_delete(url, fake):
    fake.add_adapter("b", rank=16)
    fake.add_adapter("a", rank=8)
    with Client(url) as client:
        listed = client.list_adapters()
        assert [(a.id, a.rank, a.target_modules) for a in listed] == [
            ("b", 16, ("q_proj", "v_proj")), ("a", 8, ("q_proj", "v_proj"))]
        assert client.get_adapter("a").bytes == 4096 * 8
        pinned = client.pin_adapter("a")
        assert pinned.pinned and pinned.tier == "device"
        assert not client.unpin_adapter("a").pinned
        assert client.delete_adapter("a") is None
        assert [a.id for a in client.list_adapters()] == ["b"]
        for call in (client.get_adapter, client.delete_adapter, client.pin_adapter, client.unpin_adapter):
            with pytest.raises(NotFoundError, match="'a' is not registered"):
                call("a")


def test_adapter_ids_are_quoted_in_paths(url, fake):
    with Client(url) as client:
        with pytest.raises(LoramuxError):
            client.get_adapter("../health")
    assert fake.requests[-1]["raw_path"] == b"/v1/adapters/..%2Fhealth"  # not normalized to /v1/health


# --------------------------------------------------------------------------- keys and request ids


def test_api_key_sent_and_checked(url, fake):
    fake.admin_key, fake.user_key = "admin-secret", "user-secret"
    with Client(url, api_key="user-secret") as client:
        assert client.generate("hi").text
        assert sent(fake, "/generate")["headers"]["authorization"] == "Bearer user-secret"
        with pytest.raises(AuthenticationError, match="admin API key") as forbidden:
            client.list_adapters()
    assert forbidden.value.status_code == 403 and forbidden.value.error_type == "PermissionDeniedError"
    with Client(url) as client:
        with pytest.raises(AuthenticationError) as tgi:
            client.generate("hi")
        with pytest.raises(AuthenticationError) as openai:
            client.chat("hi")
    assert (tgi.value.status_code, tgi.value.error_type) == (401, "authentication")
    assert (openai.value.status_code, openai.value.error_type) == (401, "AuthenticationError")
    with Client(url, api_key="admin-secret") as client:
        assert client.list_adapters() == ()
    assert "authorization" not in [r for r in fake.requests if r["path"] == "/v1/chat/completions"][-1]["headers"]


def test_trailing_slash_and_user_agent(url, fake):
    with Client(url + "/") as client:
        client.health()
    assert sent(fake, "/health")["headers"]["user-agent"].startswith("loramux-client/")
    assert repr(Client(url)) == f"Client({url!r})"


def test_stream_can_be_abandoned(url):
    with Client(url) as client:
        stream = client.generate_stream("hi", max_new_tokens=50)
        next(stream)
        stream.close()  # frees the connection
        assert client.generate("again").text  # the pool is still usable

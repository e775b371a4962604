"""POST /v1/adapters in process, over a real adapter store: Content-Length and the upload
limit checked before the body is spooled, a bound on uploads at once (429), the form
closed in every case, peft folders accepted with their extras named, pickles refused."""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
import zipfile
from types import SimpleNamespace

import httpx
import pytest
import starlette.formparsers
from fastapi import FastAPI

from loramux.server.api import adapters
from loramux.server.api.auth import check_admin_key
from loramux.server.config import ServerConfig
from tests.adapter_store.store_fixtures import adapter_files, make_store

MAX_UPLOAD = 256 << 10


class TrackedSpool(starlette.formparsers.SpooledTemporaryFile):
    """The multipart parser's spooled files, remembered so a test can see they were closed."""

    made: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        TrackedSpool.made.append(self)


@pytest.fixture
def spools(monkeypatch):
    TrackedSpool.made = []
    monkeypatch.setattr(starlette.formparsers, "SpooledTemporaryFile", TrackedSpool)
    yield TrackedSpool.made
    assert all(f.closed for f in TrackedSpool.made), "a spooled upload file was left open"


@pytest.fixture
def store(tmp_path):
    store = make_store(None, upload_root=tmp_path / "uploads", max_upload_bytes=MAX_UPLOAD,
                       max_concurrent_uploads=1)
    store.start(run_loader=False)
    yield store
    store.close()


@pytest.fixture
def app(store):
    app = FastAPI()
    app.include_router(adapters.router)
    app.state.service = SimpleNamespace(parts=SimpleNamespace(store=store))
    app.state.server_config = ServerConfig()
    app.dependency_overrides[check_admin_key] = lambda: None
    return app


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def files_form(adapter_id: str, files: dict[str, bytes]) -> dict:
    return {"data": {"adapter_id": adapter_id},
            "files": [("files", (name, data, "application/octet-stream")) for name, data in files.items()]}


def good_files() -> dict[str, bytes]:
    config, weights = adapter_files()
    return {"adapter_config.json": config, "adapter_model.safetensors": weights}


def post(app, **kwargs) -> httpx.Response:
    async def go():
        async with client(app) as c:
            return await c.post("/v1/adapters", **kwargs)

    return asyncio.run(go())


def test_a_peft_folder_is_accepted_and_its_extras_named(app, spools):
    files = {"README.md": b"# card", **good_files(), "tokenizer.json": b"{}",
             "training_args.bin": b"\x80\x04pickle", "special_tokens_map.json": b"{}"}
    r = post(app, **files_form("folder", files))
    assert r.status_code == 201, r.text
    assert sorted(r.json()["ignored_files"]) == ["README.md", "special_tokens_map.json", "tokenizer.json",
                                                 "training_args.bin"]
    assert spools


def test_folder_paths_in_file_names_are_reduced_to_names(app, spools):
    files = {f"my-adapter/{name}": data for name, data in good_files().items()}
    files["my-adapter/README.md"] = b"card"
    r = post(app, **files_form("nested", files))
    assert r.status_code == 201, r.text
    assert r.json()["ignored_files"] == ["README.md"]


def test_an_archive_of_a_peft_folder_is_accepted(app, spools):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in {**good_files(), "README.md": b"card"}.items():
            archive.writestr(f"run/{name}", data)
    r = post(app, data={"adapter_id": "zipped"}, files={"file": ("a.zip", buffer.getvalue())})
    assert r.status_code == 201, r.text
    assert r.json()["ignored_files"] == ["run/README.md"]


def test_pickled_weights_alone_get_a_clear_400(app, spools):
    files = {"adapter_config.json": good_files()["adapter_config.json"], "adapter_model.bin": b"\x80\x04x"}
    r = post(app, **files_form("pickled", files))
    assert r.status_code == 400
    assert "adapter_model.bin" in r.json()["error"]["message"] and "never loaded" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "kwargs, status, words",
    [
        (files_form("x", {"adapter_config.json": b"{}"}), 400, "lacks adapter_model.safetensors"),
        ({"data": {"adapter_id": "x"}, "files": {"file": ("a.tar.xz", b"\xfd7zXZ\x00")}}, 400, "only .zip and .tar.gz"),
        ({"data": {"adapter_id": "x"}, "files": {"file": ("a.zip", b"PK\x03\x04 corrupt")}}, 400, "zip"),
        (files_form("x", {**good_files(), "adapter_config.json": json.dumps({"r": 4, "lora_alpha": 1e38,
                                                                             "target_modules": ["q_proj"]}).encode()}),
         422, "lora_alpha"),
        (files_form("x", {"adapter_config.json": b"{}", "adapter_model.safetensors": bytes(MAX_UPLOAD + 1)}), 413,
         "limit"),
        (files_form("x", {**good_files(), "adapter_config.json": json.dumps({"r": 4, "lora_alpha": 8,
                                                                             "target_modules": ["q_proj"],
                                                                             "modules_to_save": ["lm_head"]}).encode()}),
         422, "unsupported feature: modules_to_save (whole trained copies of base modules)"),
        ({"content": b"{}", "headers": {"content-type": "application/json"}}, 400, "multipart/form-data"),
    ],
    ids=["missing", "tar-xz", "corrupt-zip", "absurd-alpha", "too-large", "modules-to-save", "not-multipart"],
)
def test_refusals_close_the_form(app, spools, kwargs, status, words):
    r = post(app, **kwargs)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_a_declared_content_length_over_the_limit_is_refused_before_the_body_is_read(app, spools):
    read = []

    async def body():
        read.append(True)
        yield b"x" * 1024

    r = post(app, content=body(), headers={"content-type": "multipart/form-data; boundary=b",
                                          "content-length": str(MAX_UPLOAD * 4)})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    assert read == [] and spools == []  # nothing read, nothing spooled


def test_a_chunked_body_is_stopped_at_the_limit(app, spools):
    sent = []

    async def body():
        yield b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"adapter_model.safetensors\"\r\n\r\n"
        for _ in range(MAX_UPLOAD // 1024 * 4):
            sent.append(1024)
            yield b"\0" * 1024

    r = post(app, content=body(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    assert sum(sent) < MAX_UPLOAD * 2  # stopped while streaming, not after the whole body


def test_one_upload_too_many_gets_429_and_the_slot_comes_back(app, spools):
    async def go():
        release = asyncio.Event()

        async def slow_body():
            yield b"--b\r\nContent-Disposition: form-data; name=\"adapter_id\"\r\n\r\nslow\r\n"
            await release.wait()
            yield b"--b--\r\n"

        async with client(app) as c:
            first = asyncio.create_task(c.post("/v1/adapters", content=slow_body(),
                                               headers={"content-type": "multipart/form-data; boundary=b"}))
            await asyncio.sleep(0.2)  # the first upload holds the only slot
            second = await c.post("/v1/adapters", **files_form("second", good_files()))
            release.set()
            first = await first
            third = await c.post("/v1/adapters", **files_form("third", good_files()))
            return first, second, third

    first, second, third = asyncio.run(go())
    assert second.status_code == 429 and second.headers["retry-after"]
    assert "in progress" in second.json()["error"]["message"]
    assert first.status_code == 400  # no files: but it was served, not refused for load
    assert third.status_code == 201, third.text


def test_ids_that_differ_only_in_case_get_409(app, spools):
    assert post(app, **files_form("Shared", good_files())).status_code == 201
    r = post(app, **files_form("shared", good_files()))
    assert r.status_code == 409 and r.json()["error"]["param"] == "adapter_id"


def test_lone_surrogates_in_a_config_are_a_422_not_a_500(app, spools):
    files = good_files()
    files["adapter_config.json"] = (b'{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], '
                                    b'"init_lora_weights": "pissa\\ud800"}')
    r = post(app, **files_form("surrogate", files))
    assert r.status_code == 422, r.text
    assert "pissa\\ud800" in r.json()["error"]["message"]


def test_undecodable_member_names_are_named_escaped(app, spools):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", encoding="utf-8", errors="surrogateescape") as archive:
        for name, data in {**good_files(), "caf\udce9.md": b"card"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    r = post(app, data={"adapter_id": "latin"}, files={"file": ("a.tar.gz", buffer.getvalue())})
    assert r.status_code == 201, r.text
    assert r.json()["ignored_files"] == ["caf\\udce9.md"]


def test_unusable_lora_paths_are_4xx(tmp_path, spools):
    adapter_dir = tmp_path / "adapters"
    adapter_dir.mkdir()
    store = make_store(adapter_dir, upload_root=tmp_path / "uploads")
    store.start(run_loader=False)
    app = FastAPI()
    app.include_router(adapters.router)
    app.state.service = SimpleNamespace(parts=SimpleNamespace(store=store))
    app.state.server_config = ServerConfig()
    app.dependency_overrides[check_admin_key] = lambda: None

    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return [
                await c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
                for path in (f"{adapter_dir}/a\x00b", f"{adapter_dir}/{'a' * 5000}")
            ]

    try:
        for r in asyncio.run(go()):
            assert 400 <= r.status_code < 500, r.text
            assert str(tmp_path) not in r.json()["error"]["message"]
    finally:
        store.close()

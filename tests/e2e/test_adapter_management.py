"""Adapter management over HTTP: upload (files, .zip, .tar.gz), list, use, replace, delete,
pin; every kind of bad upload is refused with a 4xx and a message while the server keeps
serving; vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import MAX_UPLOAD_BYTES, TINY_NAME, copy_adapter

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PROMPT = "The capital of France is"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def admin(tiny_server):
    with tiny_server.client(admin=True) as c:
        yield c


@pytest.fixture(scope="module")
def user(tiny_server):
    with tiny_server.client() as c:
        yield c


@pytest.fixture(scope="module")
def expected(tiny_reference):
    """adapter folder name (or None) -> the offline engine's greedy text for PROMPT."""
    ids = tiny_reference.prompt_ids(PROMPT)
    names = [None, "alpha", "gamma", "gamma-v2"]
    results = tiny_reference.run([(ids, n, {"max_tokens": MAX_TOKENS, "temperature": 0.0}) for n in names])
    texts = {n: r.text for n, r in zip(names, results)}
    assert len(set(texts.values())) == len(names), texts
    return texts


def files_of(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in (CONFIG, WEIGHTS)}


def multipart(adapter_id: str | None, files: dict[str, bytes]) -> dict:
    return {
        "data": {} if adapter_id is None else {"adapter_id": adapter_id},
        "files": [("files", (name, data, "application/octet-stream")) for name, data in files.items()],
    }


def zip_bytes(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)  # a symlink, as `zip --symlinks` stores it
            archive.writestr(info, target)
    return buffer.getvalue()


def tar_bytes(members: dict[str, bytes], symlinks: dict[str, str] | None = None,
              hardlinks: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for kind, links in ((tarfile.SYMTYPE, symlinks), (tarfile.LNKTYPE, hardlinks)):
            for name, target in (links or {}).items():
                info = tarfile.TarInfo(name)
                info.type = kind
                info.linkname = target
                archive.addfile(info)
    return buffer.getvalue()


def complete(client: httpx.Client, model: str) -> httpx.Response:
    return client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                                                "temperature": 0})


def text_of(client: httpx.Client, model: str) -> str:
    r = complete(client, model)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_upload_list_use_replace_delete(admin, user, tiny_files, expected):
    v1 = files_of(tiny_files.spare / "gamma")
    r = admin.post("/v1/adapters", **multipart("uploaded", v1))
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["id"] == "uploaded" and info["version"] == 1 and info["rank"] == 8 and info["source"] == "upload"
    assert "uploaded" in [a["id"] for a in admin.get("/v1/adapters").json()["data"]]
    assert admin.get("/v1/adapters/uploaded").json()["version"] == 1
    models = {m["id"]: m for m in user.get("/v1/models").json()["data"]}
    assert models["uploaded"]["parent"] == TINY_NAME
    assert text_of(user, "uploaded") == expected["gamma"]

    # Replace: a new version, and new requests use the new weights.
    r = admin.post("/v1/adapters", **multipart("uploaded", files_of(tiny_files.spare / "gamma-v2")))
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 2
    assert admin.get("/v1/adapters/uploaded").json()["version"] == 2
    assert text_of(user, "uploaded") == expected["gamma-v2"] != expected["gamma"]

    r = admin.delete("/v1/adapters/uploaded")
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert admin.get("/v1/adapters/uploaded").status_code == 404
    assert admin.delete("/v1/adapters/uploaded").status_code == 404
    r = complete(user, "uploaded")
    assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"
    assert "uploaded" not in [m["id"] for m in user.get("/v1/models").json()["data"]]
    assert not (tiny_files.uploads / "uploaded").exists()


def test_upload_peft_folder_ignores_and_names_extra_files(admin, user, tiny_files, expected):
    """A folder as peft's save_pretrained writes it, plus what a trainer leaves beside it."""
    files = {"README.md": b"---\nlibrary_name: peft\n---\n", **files_of(tiny_files.spare / "gamma"),
             "tokenizer.json": b"{}", "tokenizer_config.json": b"{}", "training_args.bin": b"\x80\x04pickle",
             "evil.py": b"import os"}
    r = admin.post("/v1/adapters", **multipart("peft-folder", files))
    assert r.status_code == 201, r.text
    assert sorted(r.json()["ignored_files"]) == sorted(
        ["README.md", "tokenizer.json", "tokenizer_config.json", "training_args.bin", "evil.py"])
    assert sorted(p.name for p in (tiny_files.uploads / "peft-folder").glob("*/*")) == [CONFIG, WEIGHTS]
    assert text_of(user, "peft-folder") == expected["gamma"]
    assert admin.delete("/v1/adapters/peft-folder").status_code == 200


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_upload_archive(admin, user, tiny_files, expected, kind):
    members = {f"checkpoint/final/{name}": data for name, data in files_of(tiny_files.spare / "gamma").items()}
    members["checkpoint/README.md"] = b"ignored"
    data = zip_bytes(members) if kind == "zip" else tar_bytes(members)
    adapter_id = f"from-{kind.replace('.', '-')}"
    r = admin.post("/v1/adapters", data={"adapter_id": adapter_id},
                   files={"file": (f"adapter.{kind}", data, "application/octet-stream")})
    assert r.status_code == 201, r.text
    assert r.json()["ignored_files"] == ["checkpoint/README.md"]
    assert text_of(user, adapter_id) == expected["gamma"]
    assert admin.delete(f"/v1/adapters/{adapter_id}").status_code == 200


def _bad_uploads(spare: Path, bad: Path) -> dict[str, tuple[dict, int, str]]:
    """name -> (request kwargs, status, a word the message must hold)."""
    good = files_of(spare / "gamma")
    config, weights = good[CONFIG], good[WEIGHTS]
    big = os.urandom(MAX_UPLOAD_BYTES + (1 << 20))
    archive = lambda data, name="adapter.zip": {  # noqa: E731
        "data": {"adapter_id": "bad"}, "files": {"file": (name, data, "application/octet-stream")}}
    return {
        "missing-weights": (multipart("bad", {CONFIG: config}), 400, WEIGHTS),
        "missing-config": (multipart("bad", {WEIGHTS: weights}), 400, CONFIG),
        "no-files": ({"data": {"adapter_id": "bad"}, "files": {}}, 400, "attach"),
        "no-id": (multipart(None, good), 400, "adapter_id"),
        "pickled-bin-only": (multipart("bad", {CONFIG: config, "adapter_model.bin": b"\x80\x04pickle"}), 400, ".bin"),
        "bad-json": (multipart("bad", {CONFIG: b"{not json", WEIGHTS: weights}), 422, "json"),
        "config-not-lora": (multipart("bad", {CONFIG: b'{"peft_type": "PREFIX_TUNING"}', WEIGHTS: weights}), 422,
                            "PREFIX_TUNING"),
        "truncated-safetensors": (multipart("bad", {CONFIG: config, WEIGHTS: weights[: len(weights) // 2]}), 422,
                                  "safetensors"),
        "garbage-safetensors": (multipart("bad", {CONFIG: config, WEIGHTS: b"\x00" * 64}), 422, "safetensors"),
        "wrong-shapes": (multipart("bad", files_of(bad / "wrong-shape")), 422, "shape"),
        "rank-above-max": (multipart("bad", files_of(bad / "rank32")), 422, "rank"),
        "id-dotdot": (multipart("../x", good), 400, "invalid adapter id"),
        "id-slash": (multipart("a/b", good), 400, "invalid adapter id"),
        "id-hidden": (multipart(".hidden", good), 400, "invalid adapter id"),
        "too-large": (multipart("bad", {CONFIG: config, WEIGHTS: big}), 413, f"limit of {MAX_UPLOAD_BYTES} bytes"),
        "too-large-archive": (archive(zip_bytes({CONFIG: config, WEIGHTS: big})), 413, "limit"),
        # Small compressed, too large expanded: reading stops at the cap.
        "zip-bomb": (archive(zip_bytes({CONFIG: config, WEIGHTS: bytes(MAX_UPLOAD_BYTES + 1)})), 400, "limit"),
        "zip-symlink": (archive(zip_bytes({CONFIG: config}, {WEIGHTS: str(spare / "gamma" / WEIGHTS)})), 400,
                        WEIGHTS),
        "tar-symlink": (archive(tar_bytes({CONFIG: config}, {WEIGHTS: str(spare / "gamma" / WEIGHTS)}),
                                "adapter.tar.gz"), 400, WEIGHTS),
        "tar-hardlink": (archive(tar_bytes({CONFIG: config, "w": weights}, hardlinks={WEIGHTS: "w"}),
                                 "adapter.tar.gz"), 400, WEIGHTS),
        "zip-missing-member": (archive(zip_bytes({f"x/{CONFIG}": config})), 400, WEIGHTS),
        "zip-duplicate-member": (archive(zip_bytes({CONFIG: config, WEIGHTS: weights, f"x/{WEIGHTS}": weights})),
                                 400, "more than once"),
        "not-an-archive": (archive(b"this is not a zip file", "adapter.tar.gz"), 400, "archive"),
        "tar-xz": (archive(b"\xfd7zXZ\x00\x00", "adapter.tar.xz"), 400, "only .zip and .tar.gz"),
        "plain-tar": (archive(b"x" * 1024, "adapter.tar"), 400, "only .zip and .tar.gz"),
        "not-multipart": ({"json": {"adapter_id": "bad"}}, 400, "form"),
    }


BAD_CASES = [
    "missing-weights", "missing-config", "no-files", "no-id", "pickled-bin-only", "bad-json",
    "config-not-lora", "truncated-safetensors", "garbage-safetensors", "wrong-shapes", "rank-above-max",
    "id-dotdot", "id-slash", "id-hidden", "too-large", "too-large-archive", "zip-bomb", "zip-symlink", "tar-symlink",
    "tar-hardlink", "zip-missing-member", "zip-duplicate-member", "not-an-archive", "tar-xz", "plain-tar", "not-multipart",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_upload_is_refused_and_server_keeps_serving(admin, user, tiny_files, expected, case):
    kwargs, status, word = _bad_uploads(tiny_files.spare, tiny_files.bad)[case]
    r = admin.post("/v1/adapters", **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    assert word.lower() in error["message"].lower(), error["message"]
    assert str(tiny_files.uploads) not in error["message"]  # no server paths leak
    # Nothing of it stays, and the server still serves.
    assert admin.get("/v1/adapters/bad").status_code == 404
    assert not (tiny_files.uploads / "bad").exists()
    assert list((tiny_files.uploads / ".staging").iterdir()) == []
    assert text_of(user, TINY_NAME) == expected[None]


def test_pin_and_unpin(admin):
    r = admin.post("/v1/adapters/alpha/pin")
    assert r.status_code == 200 and r.json()["pinned"] is True
    r = admin.post("/v1/adapters/alpha/unpin")
    assert r.status_code == 200 and r.json()["pinned"] is False
    assert admin.post("/v1/adapters/nope/pin").status_code == 404
    assert admin.post("/v1/adapters/a..b/pin").status_code == 400


def test_vllm_load_and_unload_lora_adapter(admin, user, tiny_files, expected):
    inside = copy_adapter(tiny_files.adapters / "alpha", tiny_files.adapters / "delta")  # after the start-up scan
    link = tiny_files.adapters / "sneaky"
    link.symlink_to(tiny_files.spare / "gamma", target_is_directory=True)
    try:
        r = admin.post("/v1/load_lora_adapter", json={"lora_name": "delta", "lora_path": str(inside)})
        assert r.status_code == 200, r.text
        assert "delta" in r.text
        assert text_of(user, "delta") == expected["alpha"]  # alpha's weights under another name
        assert admin.get("/v1/adapters/delta").json()["source"] == "directory"

        r = admin.post("/v1/load_lora_adapter", json={"lora_name": "delta", "lora_path": str(inside)})
        assert r.status_code == 400 and "already" in r.json()["error"]["message"]
        r = admin.post("/v1/load_lora_adapter",
                       json={"lora_name": "delta", "lora_path": str(inside), "load_inplace": True})
        assert r.status_code == 200, r.text

        for path in (tiny_files.spare / "gamma", tiny_files.adapters / ".." / "spare" / "gamma", link, Path("/"),
                     tiny_files.adapters):
            r = admin.post("/v1/load_lora_adapter", json={"lora_name": "outside", "lora_path": str(path)})
            assert r.status_code == 400, (path, r.text)
            assert r.json()["error"]["param"] == "lora_path"
        assert admin.get("/v1/adapters/outside").status_code == 404
        r = admin.post("/v1/load_lora_adapter", json={"lora_name": "../x", "lora_path": str(inside)})
        assert r.status_code == 400
        r = admin.post("/v1/load_lora_adapter", json={"lora_name": "empty", "lora_path": str(tiny_files.adapters
                                                                                            / "missing")})
        assert 400 <= r.status_code < 500

        r = admin.post("/v1/unload_lora_adapter", json={"lora_name": "delta"})
        assert r.status_code == 200 and "delta" in r.text
        assert complete(user, "delta").status_code == 404
        assert admin.post("/v1/unload_lora_adapter", json={"lora_name": "delta"}).status_code == 404
        assert inside.is_dir()  # the store never deletes a directory it did not create
    finally:
        link.unlink()
        shutil.rmtree(inside)
    assert text_of(user, TINY_NAME) == expected[None]

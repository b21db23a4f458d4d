"""Files API on the real app (SQLite and PostgreSQL): upload with every line validated, list/get/content/delete,
content-addressed blobs collected when unreferenced, limits while streaming, bad input → 4xx, nothing stored."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.db.models import File
from tests.api.fixtures_admin import Api, bearer
from tests.api.fixtures_training import jsonl, pc, rows, run_train_api, train_api_fixture, upload_file  # noqa: F401


def test_upload_list_get_content_delete(train_api: Api) -> None:
    api = train_api
    _, key = api.tenant("acme")
    data = jsonl([pc(0), {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    r = upload_file(api, key, data, filename="dir/../train.jsonl")
    assert r.status_code == 200, r.text
    f = r.json()
    assert f["id"].startswith("file-") and f["object"] == "file" and f["bytes"] == len(data)
    assert (f["filename"], f["purpose"], f["status"]) == ("train.jsonl", "fine-tune", "processed")
    assert isinstance(f["created_at"], int)
    second = upload_file(api, key, jsonl([pc(1)]), filename="b.jsonl").json()

    listed = api.client.get("/v1/files", headers=bearer(key)).json()
    assert [x["id"] for x in listed["data"]] == [second["id"], f["id"]] and listed["has_more"] is False
    page = api.client.get("/v1/files?limit=1", headers=bearer(key)).json()
    assert [x["id"] for x in page["data"]] == [second["id"]] and page["has_more"] is True
    page2 = api.client.get(f"/v1/files?limit=1&after={page['last_id']}", headers=bearer(key)).json()
    assert [x["id"] for x in page2["data"]] == [f["id"]] and page2["has_more"] is False
    asc = api.client.get("/v1/files?order=asc", headers=bearer(key)).json()
    assert [x["id"] for x in asc["data"]] == [f["id"], second["id"]]
    assert api.client.get("/v1/files?purpose=batch", headers=bearer(key)).json()["data"] == []

    assert api.client.get(f"/v1/files/{f['id']}", headers=bearer(key)).json() == f
    content = api.client.get(f"/v1/files/{f['id']}/content", headers=bearer(key))
    assert content.status_code == 200 and content.content == data
    assert 'filename="train.jsonl"' in content.headers["content-disposition"]

    r = api.client.delete(f"/v1/files/{f['id']}", headers=bearer(key))
    assert r.status_code == 200 and r.json() == {"id": f["id"], "object": "file", "deleted": True}
    for path in (f"/v1/files/{f['id']}", f"/v1/files/{f['id']}/content"):
        missing = api.client.get(path, headers=bearer(key))
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert api.client.delete(f"/v1/files/{f['id']}", headers=bearer(key)).status_code == 404
    assert rows(api, File) == 1 and len(api.blob_files()) == 1


def test_identical_uploads_share_one_blob_until_both_are_deleted(train_api: Api) -> None:
    api = train_api
    _, a = api.tenant("a")
    _, b = api.tenant("b")
    data = jsonl([pc(0)])
    ids = [upload_file(api, a, data).json()["id"], upload_file(api, b, data).json()["id"]]
    assert ids[0] != ids[1] and len(api.blob_files()) == 1
    api.client.delete(f"/v1/files/{ids[0]}", headers=bearer(a))
    assert len(api.blob_files()) == 1  # b's file still needs it
    assert api.client.get(f"/v1/files/{ids[1]}/content", headers=bearer(b)).content == data
    api.client.delete(f"/v1/files/{ids[1]}", headers=bearer(b))
    assert api.blob_files() == []


@pytest.mark.parametrize(("data", "fragment"), [
    (b"", "no examples"),
    (b"\n\n", "no examples"),
    (jsonl([pc(0)]) + b'{"prompt": "x", "completion": }\n', "line 2: invalid JSON"),
    (jsonl([pc(0), pc(1)]) + b"\n" + json.dumps({"prompt": "x"}).encode(), "line 4: missing `completion`"),
    (jsonl([{"messages": [{"role": "robot", "content": "x"}]}]), "line 1: messages[0].role must be one of"),
    (b"\xff\xfe\n", "line 1: not valid UTF-8"),
    (jsonl([pc(0)]) + b"[]\n", "line 2: expected a JSON object"),
])
def test_bad_files_are_refused_with_the_line_and_nothing_is_stored(train_api: Api, data: bytes,
                                                                   fragment: str) -> None:
    api = train_api
    _, key = api.tenant("acme")
    r = upload_file(api, key, data, filename="bad.jsonl")
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and "'bad.jsonl'" in err["message"]
    assert (err["param"], err["code"], err["type"]) == ("file", "invalid_file", "invalid_request_error")
    assert rows(api, File) == 0 and api.blob_files() == []


def test_bad_forms(train_api: Api) -> None:
    api = train_api
    _, key = api.tenant("acme")
    data = jsonl([pc(0)])
    r = upload_file(api, key, data, purpose="assistants")
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
    assert "accepts \"fine-tune\" and \"batch\"" in r.json()["error"]["message"]
    r = api.client.post("/v1/files", headers=bearer(key), files={"file": ("a.jsonl", data)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_purpose"
    r = api.client.post("/v1/files", headers=bearer(key), data={"purpose": "fine-tune"},
                        files={"other": ("a.jsonl", data)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_file"
    r = api.client.post("/v1/files", headers=bearer(key), data={"purpose": "fine-tune", "file": "not a file part"},
                        files={"other": ("a.jsonl", data)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_file"
    r = api.client.post("/v1/files", headers=bearer(key), data={"purpose": "fine-tune"})  # urlencoded
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]
    r = api.client.post("/v1/files", headers=bearer(key), json={"purpose": "fine-tune"})
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]
    assert api.client.get("/v1/files?limit=0", headers=bearer(key)).status_code == 400
    r = api.client.get("/v1/files?after=file-nope", headers=bearer(key))
    assert r.status_code == 400 and r.json()["error"]["param"] == "after"
    # Not even the form of an id (NUL would be refused by PostgreSQL): answered like a missing one.
    assert api.client.get("/v1/files/file-a%00b", headers=bearer(key)).status_code == 404
    assert rows(api, File) == 0 and api.blob_files() == []


@pytest.fixture
def small_api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Api]:
    yield from run_train_api(request, tmp_path, max_file_bytes=4096, max_file_examples=3)


def test_size_and_example_limits(small_api: Api) -> None:
    api = small_api
    _, key = api.tenant("acme")
    assert upload_file(api, key, jsonl([pc(i) for i in range(3)])).status_code == 200
    r = upload_file(api, key, jsonl([pc(i) for i in range(4)]))
    assert r.status_code == 400 and "line 4: too many examples: at most 3" in r.json()["error"]["message"]
    r = upload_file(api, key, jsonl([pc(0, pad=5000)]))
    assert r.status_code == 413 and "4096" in r.json()["error"]["message"]

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted while streaming, cut off past the limit
        yield b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jsonl"\r\n\r\n'
        for _ in range(200):
            yield b"\n" * 1024
        yield b"\r\n--b--\r\n"

    r = api.client.post("/v1/files", content=chunked(),
                        headers={**bearer(key), "content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    assert rows(api, File) == 1 and len(api.blob_files()) == 1


def test_scopes(train_api: Api) -> None:
    api = train_api
    tenant_id, _ = api.tenant("acme")
    r = api.client.post(f"/admin/tenants/{tenant_id}/keys", json={"scopes": ["inference"]},
                        headers={"Authorization": "Bearer test-admin"})
    inference_only = r.json()["key"]
    assert upload_file(api, inference_only, jsonl([pc(0)])).status_code == 403
    assert api.client.get("/v1/files", headers=bearer(inference_only)).status_code == 403
    assert api.client.get("/v1/files", headers={"Authorization": "Bearer test-admin"}).status_code == 403

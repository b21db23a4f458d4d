"""The web console in a real browser (headless Chromium), against a real server: sign-in, uploading a prefix by
drag and drop, downloading and deleting it, a training job followed to its loss curve, the playground streaming
two models side by side, the usage page, the admin's tenants, and a foreign tenant's objects answering like
missing ones. Every wait is on a page element or event. Screenshots: console-screenshots/."""

from __future__ import annotations

import json
import re
import zipfile
from io import BytesIO
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from tests.console.conftest import ADMIN_KEY, Console, drop_files, shot, sign_in

pytestmark = pytest.mark.browser

def peft_files() -> dict[str, bytes]:
    """A PEFT prefix-tuning adapter for random:tiny-llama (2 layers, 2 KV heads of 16), as its two files."""
    import torch

    from prefix_store.peft_codec import encode_peft
    from prefix_store.types import ModelSpec, PrefixKV

    spec = ModelSpec("random:tiny-llama", "unused", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float32")
    g = torch.Generator().manual_seed(0)
    kv = PrefixKV(torch.randn(2, 2, 3, 16, generator=g), torch.randn(2, 2, 3, 16, generator=g))
    return encode_peft(kv, spec=spec, base_model_name_or_path="random:tiny-llama")


def training_jsonl() -> bytes:
    return b"".join(json.dumps({"prompt": f"name: N{i} =>", "completion": f" N{i}."}).encode() + b"\n"
                    for i in range(16))


@pytest.fixture(scope="module")
def served(console: Console) -> str:
    """A prefix of the first tenant, trained through the API (2 steps), for the tests that serve one."""
    file_id = console.api("POST", "/v1/files", data={"purpose": "fine-tune"},
                          files={"file": ("t.jsonl", training_jsonl(), "application/jsonl")}).json()["id"]
    job = console.api("POST", "/v1/fine_tuning/jobs", json={
        "model": "random:tiny-llama", "training_file": file_id, "suffix": "served", "num_virtual_tokens": 4,
        "hyperparameters": {"max_steps": 2, "batch_size": 4}}).json()
    # The events stream ends ([DONE]) once the job has finished.
    with httpx.stream("GET", f"{console.url}/v1/fine_tuning/jobs/{job['id']}/events?stream=true", timeout=120,
                      headers={"Authorization": f"Bearer {console.key}"}) as r:
        assert [line for line in r.iter_lines() if line.startswith("data: ")][-1] == "data: [DONE]"
    job = console.api("GET", f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job
    return "served"


def test_sign_in_keeps_the_key_in_the_tab_only(page: Any, console: Console) -> None:
    page.goto(console.url + "/console")
    shot(page, "sign-in")
    page.get_by_label("API key").fill("psk-not-a-key")
    page.get_by_role("button", name="Sign in").click()
    assert page.get_by_role("alert").inner_text() == "invalid API key"  # the API's own message
    page.get_by_label("API key").fill(console.key)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("heading", name="Prefixes", level=1).wait_for()
    stored = page.evaluate("sessionStorage.getItem('prefixserve.console')")
    assert json.loads(stored) == {"key": console.key, "role": "tenant"}
    assert console.key not in page.url and not page.context.cookies()
    assert page.evaluate("localStorage.length") == 0
    page.get_by_role("button", name="Sign out").click()
    page.get_by_role("heading", name="Sign in").wait_for()
    assert page.evaluate("sessionStorage.length") == 0
    # The key reached the server in the Authorization header only, which is never logged.
    assert console.key not in console.server.log_path.read_text()


def test_admin_sees_tenants_keys_and_limits(page: Any, console: Console) -> None:
    sign_in(page, console, ADMIN_KEY, heading="Tenants")
    assert [a.inner_text() for a in page.get_by_role("navigation").get_by_role("link").all()] == ["Tenants"]
    page.get_by_role("button", name="acme").click()
    page.get_by_role("heading", name="acme", level=2).wait_for()
    page.get_by_label("requests_per_minute").fill("500")
    with page.expect_response(lambda r: r.url.endswith("/limits") and r.request.method == "PUT") as put:
        page.get_by_role("button", name="Save limits").click()
    assert put.value.status == 200
    tenant_id = put.value.json()["tenant_id"]
    r = console.api("GET", f"/admin/tenants/{tenant_id}/limits", key=ADMIN_KEY)
    assert r.json()["configured"]["requests_per_minute"] == 500
    page.get_by_role("button", name="Revoke key").first.wait_for()
    shot(page, "admin")


def test_upload_by_drop_download_and_delete(page: Any, console: Console) -> None:
    # A listener from the start: Chromium intercepts file choosers only once one is registered, and registering
    # it inside expect_file_chooser races with the key press.
    page.on("filechooser", lambda chooser: None)
    sign_in(page, console, console.key)
    page.get_by_label("Name", exact=True).fill("dropped")
    drop_files(page, ".dropzone", {"notes.txt": b"not a prefix"})
    page.get_by_role("button", name="Upload").click()
    error = page.locator("form .error")
    assert "neither a safetensors prefix nor a zip of a PEFT adapter directory" in error.inner_text()
    # The drop zone works from the keyboard too: Enter opens the file chooser.
    page.locator(".dropzone").focus()
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files([{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"x"}])
    page.get_by_text("Chosen: notes.txt").wait_for()
    drop_files(page, ".dropzone", peft_files())
    page.get_by_text("Chosen: adapter_config.json, adapter_model.safetensors").wait_for()
    page.get_by_role("button", name="Upload").click()
    page.get_by_text("Uploaded dropped@1 (3 virtual tokens").wait_for()
    section = page.locator("section.prefix", has=page.get_by_role("heading", name="dropped"))
    row = section.locator("tbody tr")
    version = console.api("GET", "/v1/prefixes/dropped").json()["versions"][0]
    assert row.locator("td[data-label='Origin']").inner_text() == "uploaded (PEFT) for random:tiny-llama"
    assert row.locator("td[data-label='Kind']").inner_text() == "prefix tuning"
    assert row.locator("td[data-label='Base model'] code").get_attribute("title") == version["base_model_fingerprint"]
    shot(page, "prefixes")
    page.set_viewport_size({"width": 390, "height": 844})  # a phone: nothing wider than the screen
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    shot(page, "prefixes-phone")
    with page.expect_download() as native:
        page.get_by_role("button", name="Download dropped@1 native").click()
    data = native.value.path().read_bytes()
    assert native.value.suggested_filename.endswith(".safetensors") and data[8:9] == b"{"
    with page.expect_download() as peft:
        page.get_by_role("button", name="Download dropped@1 PEFT").click()
    names = zipfile.ZipFile(BytesIO(peft.value.path().read_bytes())).namelist()
    assert sorted(n.rsplit("/", 1)[-1] for n in names) == ["adapter_config.json", "adapter_model.safetensors"]
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete prefix dropped").click()
    section.wait_for(state="detached")
    assert console.api("GET", "/v1/prefixes/dropped").status_code == 404


def test_many_prefixes_load_their_versions_on_demand(page: Any, console: Console) -> None:
    """Past the first 20 prefixes, versions are fetched only when asked for (each is a request)."""
    r = console.api("POST", "/admin/tenants", key=ADMIN_KEY, json={"name": "many"})
    key = r.json()["api_key"]
    files = peft_files()
    for i in range(21):
        r = console.api("POST", "/v1/prefixes", key=key, data={"name": f"p{i:02d}"},
                        files=[("files", (name, data)) for name, data in files.items()])
        assert r.status_code == 201, r.text
    detail_requests: list[str] = []
    page.on("request", lambda req: detail_requests.append(req.url) if "/v1/prefixes/p" in req.url else None)
    sign_in(page, console, key)
    last = page.locator("section.prefix", has=page.get_by_role("heading", name="p20"))
    last.get_by_role("button", name="Show the versions of p20").wait_for()
    assert page.locator("section.prefix table").count() == 20 and len(detail_requests) == 20
    last.get_by_role("button", name="Show the versions of p20").click()
    page.get_by_role("button", name="Download p20@1 PEFT").wait_for()
    assert len(detail_requests) == 21


def test_training_job_to_its_loss_curve(page: Any, console: Console, tmp_path: Any) -> None:
    sign_in(page, console, console.key)
    page.get_by_role("link", name="Training").click()
    page.get_by_role("heading", name="Training", level=1).wait_for()
    (tmp_path / "train.jsonl").write_bytes(training_jsonl())
    page.get_by_label("…or upload a training file").set_input_files(str(tmp_path / "train.jsonl"))
    page.get_by_label("Prefix name (suffix)").fill("trained")
    for label, value in (("Max steps", "12"), ("Batch size", "4"), ("Validate every", "4"),
                         ("Checkpoint every", "4"), ("Validation split", "0.25"), ("Virtual tokens", "4")):
        page.get_by_label(label, exact=True).fill(value)
    shot(page, "training")
    with page.expect_response(lambda r: "/events?stream=true" in r.url) as stream:
        page.get_by_role("button", name="Start training").click()
    assert stream.value.headers["content-type"].startswith("text/event-stream")
    chart = page.locator(".chart[data-finished]")
    chart.wait_for()
    assert chart.get_attribute("data-finished") == "succeeded"
    assert page.locator("#job-status-value").inner_text() == "succeeded"
    # The curve is drawn from the stream's metrics events: a train point per event, validation every 4 steps.
    job_id = page.url.split("#/jobs/")[1]
    events = console.api("GET", f"/v1/fine_tuning/jobs/{job_id}/events?limit=100").json()["data"]
    metrics = [e for e in events if e["type"] == "metrics"]
    trains = sum(1 for e in metrics if "train_loss" in e["data"])
    vals = sum(1 for e in metrics if "val_loss" in e["data"])
    assert trains >= 2 and vals >= 1
    assert page.locator(".chart .train").get_attribute("data-points") == str(trains)
    assert page.locator(".chart .valid").get_attribute("data-points") == str(vals)
    assert page.locator("section", has_text="Checkpoints").locator("tbody tr").count() >= 1
    shot(page, "job")


def test_job_stream_resumes_after_a_cut(page: Any, console: Console, served: str) -> None:
    """A stream cut before its [DONE] (here: the first one ends after the first metrics event) is reopened after
    the last event seen: every point drawn once."""
    job = next(j for j in console.api("GET", "/v1/fine_tuning/jobs").json()["data"]
               if j["fine_tuned_model"] == f"{served}@1")
    events = console.api("GET", f"/v1/fine_tuning/jobs/{job['id']}/events?limit=100").json()["data"][::-1]
    first_metrics = next(i for i, e in enumerate(events) if e["type"] == "metrics")
    cut = events[:first_metrics + 1]
    streams: list[str] = []

    def handle(route: Any) -> None:
        streams.append(route.request.url)
        if len(streams) > 1:
            route.continue_()
            return
        body = "".join(f"data: {json.dumps(e)}\n\n" for e in cut)  # no [DONE]: the connection just ends
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)

    page.route(re.compile(r"/events\?stream=true"), handle)
    sign_in(page, console, console.key)
    page.goto(f"{console.url}/console/#/jobs/{job['id']}")
    page.locator(".chart[data-finished='succeeded']").wait_for()
    assert len(streams) == 2 and streams[1].endswith(f"&after={cut[-1]['id']}")
    metrics = [e for e in events if e["type"] == "metrics"]
    assert len(metrics) > 1
    assert page.locator(".chart .train").get_attribute("data-points") == str(len(metrics))


def test_cancel_and_end_users(page: Any, console: Console) -> None:
    file_id = console.api("POST", "/v1/files", data={"purpose": "fine-tune"},
                          files={"file": ("t.jsonl", training_jsonl(), "application/jsonl")}).json()["id"]
    job = console.api("POST", "/v1/fine_tuning/jobs", json={
        "model": "random:tiny-llama", "training_file": file_id, "suffix": "long",
        "hyperparameters": {"max_steps": 1_000_000, "batch_size": 4}}).json()
    examples = [{"prompt": "hi", "completion": f" {i}"} for i in range(5)]
    assert console.api("POST", "/v1/users/ann/examples", json={"examples": examples}).status_code == 201
    sign_in(page, console, console.key)
    page.goto(f"{console.url}/console/#/jobs/{job['id']}")
    page.get_by_role("button", name="Cancel job").click()
    page.locator(".chart[data-finished='cancelled']").wait_for()
    personal = console.api("POST", "/v1/users/ann/personalize", json={"hyperparameters": {"max_steps": 2}}).json()
    assert console.api("POST", "/v1/users/bob/examples", json={"examples": examples[:3]}).status_code == 201
    page.get_by_role("link", name="Training").click()
    row = page.locator("tr", has_text="ann")  # listed: every end user, with or without a job
    assert row.locator("td[data-label='Examples']").inner_text() == "5"
    assert personal["id"] in row.locator("td[data-label='Last job']").inner_text()
    bob = page.locator("tr", has_text="bob")
    assert bob.locator("td[data-label='Examples']").inner_text() == "3"
    assert bob.locator("td[data-label='Last job']").inner_text() == "—"


def test_playground_streams_models_side_by_side(page: Any, console: Console, served: str) -> None:
    sign_in(page, console, console.key)
    page.get_by_role("link", name="Playground").click()
    page.get_by_role("heading", name="Playground", level=1).wait_for()
    page.get_by_label("Model 1", exact=True).fill("random:tiny-llama")
    page.get_by_role("button", name="Remove model 2").click()  # the page offers the first prefix there
    page.get_by_role("button", name="Add a model").click()
    page.get_by_label("Model 2", exact=True).fill(f"{served}@1")
    page.get_by_role("button", name="Add a model").click()
    page.get_by_label("Model 3", exact=True).fill(f"{served}+{served}@1")  # a stack
    page.get_by_text("Sampling").click()
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill("12")
    page.get_by_label("Prompt", exact=True).fill("Hello")
    code = page.locator(".code").inner_text()
    assert '"model":"random:tiny-llama"' in code and console.key not in code and "$PREFIXSERVE_API_KEY" in code
    with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as first:
        page.get_by_role("button", name="Send").click()
    assert first.value.headers["content-type"].startswith("text/event-stream")
    assert json.loads(first.value.request.post_data)["stream"] is True
    for model in ("random:tiny-llama", f"{served}@1", f"{served}+{served}@1"):
        answer = page.locator(f".answer[data-model='{model}']")
        answer.and_(page.locator("[data-state='done']")).wait_for()
        # What streamed into the column is what the same request answers without streaming.
        whole = console.api("POST", "/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "Hello"}], "temperature": 0,
            "max_tokens": 12}).json()
        assert answer.locator(".turn.assistant").inner_text() == whole["choices"][0]["message"]["content"]
        assert f"{whole['usage']['completion_tokens']} completion tokens" in answer.locator(".meta").inner_text()
    shot(page, "playground")


def test_usage_page(page: Any, console: Console) -> None:
    sign_in(page, console, console.key)
    page.get_by_role("link", name="Usage").click()
    page.get_by_role("heading", name="Usage", level=1).wait_for()
    usage = console.api("GET", "/v1/usage").json()["usage"]
    row = page.locator("tr", has_text="Prefixes")
    assert row.locator("td[data-label='Used']").inner_text() == str(usage["max_prefixes"])
    assert row.locator("td[data-label='Allowed']").inner_text() == "10000"
    assert page.locator("tr", has_text="Requests this minute").locator("meter").count() == 1
    shot(page, "usage")
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    shot(page, "usage-phone")


def test_foreign_tenant_objects_answer_like_missing_ones(page: Any, console: Console, served: str) -> None:
    jobs = console.api("GET", "/v1/fine_tuning/jobs").json()["data"]
    sign_in(page, console, console.other_key)
    expect(page.locator("#prefix-list")).to_have_text("No prefixes yet: upload one above, or train one.")

    def job_error(job_id: str) -> str:
        page.goto(f"{console.url}/console/#/jobs/{job_id}")
        page.reload()
        text: str = page.get_by_role("alert").inner_text()
        return text.replace(job_id, "<id>")

    assert job_error(jobs[0]["id"]) == job_error("ftjob-" + "x" * 24)
    page.get_by_role("link", name="Playground").click()
    page.get_by_label("Model 1", exact=True).fill(served)
    page.get_by_label("Prompt", exact=True).fill("Hi")
    page.get_by_role("button", name="Send").click()
    foreign = page.locator(f".answer[data-model='{served}'] .error").inner_text()
    page.get_by_label("Model 1", exact=True).fill("never-made")
    page.get_by_role("button", name="Send").click()
    missing = page.locator(".answer[data-model='never-made'] .error").inner_text()
    assert "never-made" in missing and missing.replace("never-made", served) == foreign

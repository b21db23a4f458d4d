"""Soft prompts through the HTTP API on the real app (random:tiny-llama): PEFT PROMPT_TUNING / P_TUNING uploads,
their kind in the listings, serving with PEFT's greedy tokens, the stack refusal, the PEFT download round trip,
and bad uploads refused with nothing stored."""

from __future__ import annotations

import copy
import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
from peft import PeftModel, PromptEncoderConfig, PromptTuningConfig, get_peft_model

from tests.api.fixtures_admin import Api, api_fixture, bearer, native_bytes, zip_bytes  # noqa: F401

PROMPT = [5, 6, 7, 8, 9]
STEPS = 8


def _save_adapter(api: Api, tmp_path: Path, name: str, config: object, seed: int) -> Path:
    """A PEFT soft-prompt adapter with random weights, made on a copy of the served model and saved."""
    assert api.runtime.model is not None
    pm = get_peft_model(copy.deepcopy(api.runtime.model.model), config)  # type: ignore[arg-type]
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in pm.prompt_encoder["default"].parameters():
            param.normal_(0.0, 1.0)
    out = tmp_path / name
    pm.eval().save_pretrained(str(out))
    return out


def _greedy(model: torch.nn.Module, steps: int = STEPS) -> list[int]:
    """PeftModel's (or the base model's) greedy tokens for PROMPT: its forward on the whole sequence each step."""
    ids: list[int] = list(PROMPT)
    for _ in range(steps):
        with torch.inference_mode():
            mask = torch.ones(1, len(ids), dtype=torch.long)
            logits = model(input_ids=torch.tensor([ids]), attention_mask=mask).logits
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(PROMPT):]


def _peft_greedy(api: Api, adapter_dir: Path) -> list[int]:
    assert api.runtime.model is not None
    return _greedy(PeftModel.from_pretrained(copy.deepcopy(api.runtime.model.model), str(adapter_dir)).eval())


def _served(api: Api, key: str, model: str) -> str:
    r = api.client.post("/v1/completions", headers=bearer(key), json={
        "model": model, "prompt": PROMPT, "max_tokens": STEPS, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    text: str = r.json()["choices"][0]["text"]
    return text


def _text(api: Api, tokens: list[int]) -> str:
    assert api.runtime.model is not None
    text: str = api.runtime.model.tokenizer.decode(tokens, skip_special_tokens=True)
    return text


def _upload_pair(api: Api, key: str, name: str, d: Path) -> dict[str, object]:
    files = [("files", (n, (d / n).read_bytes(), "application/octet-stream"))
             for n in ("adapter_config.json", "adapter_model.safetensors")]
    r = api.client.post("/v1/prefixes", headers=bearer(key), data={"name": name}, files=files)
    assert r.status_code == 201, r.text
    body: dict[str, object] = r.json()
    return body


def test_soft_prompt_upload_serve_list_download(api: Api, tmp_path: Path) -> None:
    _, key = api.tenant("acme")
    prompt_dir = _save_adapter(api, tmp_path, "pt", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6), 1)
    p_dir = _save_adapter(api, tmp_path, "ptun", PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16), 2)
    want = {"tone": _peft_greedy(api, prompt_dir), "style": _peft_greedy(api, p_dir)}
    assert api.runtime.model is not None
    assert _greedy(api.runtime.model.model) not in want.values()  # the soft prompts matter

    body = _upload_pair(api, key, "tone", prompt_dir)
    assert (body["kind"], body["source_format"], body["num_virtual_tokens"]) == ("prompt_tuning", "peft", 6)
    with zipfile.ZipFile(buf := io.BytesIO(), "w") as zf:
        for n in ("adapter_config.json", "adapter_model.safetensors"):
            zf.write(p_dir / n, n)
    r = api.upload(key, "style", buf.getvalue(), filename="style.zip")
    assert r.status_code == 201 and r.json()["kind"] == "p_tuning", r.text
    api.upload(key, "kv", native_bytes(api.spec))

    kinds = {p["name"]: p["kind"] for p in api.client.get("/v1/prefixes", headers=bearer(key)).json()["data"]}
    assert kinds == {"kv": "prefix_tuning", "style": "p_tuning", "tone": "prompt_tuning"}
    versions = api.client.get("/v1/prefixes/tone", headers=bearer(key)).json()["versions"]
    assert [v["kind"] for v in versions] == ["prompt_tuning"]
    models = {m["id"]: m["kind"] for m in api.client.get("/v1/models", headers=bearer(key)).json()["data"]}
    assert models == {api.spec.model_id: None, "kv": "prefix_tuning", "style": "p_tuning", "tone": "prompt_tuning"}
    assert api.client.get("/v1/models/style@1", headers=bearer(key)).json()["kind"] == "p_tuning"

    for name, tokens in want.items():
        assert _served(api, key, name) == _text(api, tokens), name
    assert _text(api, want["tone"]) != _text(api, want["style"]) and all(_text(api, t) for t in want.values())

    # Downloaded as PEFT, loaded by PeftModel.from_pretrained: the same greedy tokens.
    for name, peft_type in (("tone", "PROMPT_TUNING"), ("style", "P_TUNING")):
        r = api.client.get(f"/v1/prefixes/{name}/download?format=peft", headers=bearer(key))
        assert r.status_code == 200
        out = tmp_path / f"exported-{name}"
        zipfile.ZipFile(io.BytesIO(r.content)).extractall(out)
        assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == peft_type
        assert _peft_greedy(api, out) == want[name], name


@pytest.mark.parametrize("model", ["kv+tone", "tone+kv"])
def test_a_soft_prompt_in_a_stack_is_a_400(api: Api, tmp_path: Path, model: str) -> None:
    _, key = api.tenant("acme")
    _upload_pair(api, key, "tone", _save_adapter(
        api, tmp_path, "pt", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), 1))
    api.upload(key, "kv", native_bytes(api.spec))
    r = api.client.post("/v1/completions", headers=bearer(key), json={"model": model, "prompt": "hi",
                                                                      "max_tokens": 2})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "soft_prompt_not_stackable" and err["param"] == "model" and "tone@1" in err["message"]


def _soft_files(api: Api, tmp_path: Path, **changes: object) -> bytes:
    d = _save_adapter(api, tmp_path, "bad", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), 3)
    cfg = {**json.loads((d / "adapter_config.json").read_text()), **changes}
    return zip_bytes({"adapter_config.json": json.dumps(cfg).encode(),
                      "adapter_model.safetensors": (d / "adapter_model.safetensors").read_bytes()})


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"token_dim": 32}, "token_dim is 32, the served model 'random:tiny-llama' needs its hidden size 64"),
    ({"num_virtual_tokens": 4}, "expected [num_virtual_tokens, token_dim] = [4, 64]"),
    ({"num_transformer_submodules": 2}, "expected 1 (decoder-only model)"),
    ({"peft_type": "LORA"}, "expected one of ['PREFIX_TUNING', 'PROMPT_TUNING', 'P_TUNING']"),
])
def test_bad_soft_prompt_uploads_are_400_with_nothing_stored(api: Api, tmp_path: Path, changes: dict[str, object],
                                                             fragment: str) -> None:
    _, key = api.tenant("acme")
    data = _soft_files(api, tmp_path, **changes)
    r = api.upload(key, "bad", data, filename="bad.zip")
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]["message"]
    assert api.prefix_rows() == (0, 0) and api.blob_files() == []

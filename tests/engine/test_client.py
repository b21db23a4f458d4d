"""EngineClient's prefix loader: a selector the services already resolved loads without a second catalog query."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from app.engine.client import EngineClient
from prefix_store.ref import PrefixRef


class RecordingResolver:
    """Stands in for PrefixResolver: records which entry point the loader used."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def get(self, tenant_id: str, name: str, version: int | None) -> Any:
        self.calls.append(("get", (tenant_id, name, version)))
        return SimpleNamespace(kv="kv-from-get")

    def load(self, ref: PrefixRef) -> Any:
        self.calls.append(("load", ref))
        return SimpleNamespace(kv="kv-from-load")


def _client(resolver: RecordingResolver) -> EngineClient:
    return EngineClient(engine=None, tokenizer=None, resolver=resolver, model_id="m", context_length=64)  # type: ignore[arg-type]


def test_a_prefix_loads_its_exact_version_without_the_catalog() -> None:
    resolver = RecordingResolver()
    ref = PrefixRef("t1", "pid", "bot", 3, "ab" * 32, 7)
    assert _client(resolver)._loader(ref)() == "kv-from-load"
    assert resolver.calls == [("load", ref)]

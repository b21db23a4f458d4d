"""EngineClient's prefix loader: a selector the services already resolved loads without a second catalog query."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from app.engine.client import EngineClient, PrefixSelector
from prefix_store.resolver import PrefixRef


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


def test_resolved_selector_loads_its_exact_version_without_the_catalog() -> None:
    resolver = RecordingResolver()
    sel = PrefixSelector("t1", "bot", 3, prefix_id="pid", sha256="ab" * 32, num_virtual_tokens=7)
    assert _client(resolver)._loader(sel)() == "kv-from-load"
    assert resolver.calls == [("load", PrefixRef("t1", "pid", "bot", 3, "ab" * 32, 7))]


def test_bare_selector_asks_the_catalog() -> None:
    resolver = RecordingResolver()
    assert _client(resolver)._loader(PrefixSelector("t1", "bot"))() == "kv-from-get"
    assert _client(resolver)._loader(PrefixSelector("t1", "bot", 2))() == "kv-from-get"
    assert resolver.calls == [("get", ("t1", "bot", None)), ("get", ("t1", "bot", 2))]

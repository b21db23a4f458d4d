"""The kinds of virtual tokens a stored prefix version holds (torch-free: the catalog and the web layer use it)."""

from __future__ import annotations

from typing import Final, Literal

# Per-layer keys/values (PEFT PREFIX_TUNING), or learned input embeddings: trained here or imported from PEFT
# PROMPT_TUNING ("prompt_tuning"), or imported from PEFT P_TUNING, its prompt encoder's output ("p_tuning").
PrefixKind = Literal["prefix_tuning", "prompt_tuning", "p_tuning"]
PREFIX_KINDS: Final[tuple[PrefixKind, ...]] = ("prefix_tuning", "prompt_tuning", "p_tuning")
SOFT_PROMPT_KINDS: Final[frozenset[str]] = frozenset({"prompt_tuning", "p_tuning"})

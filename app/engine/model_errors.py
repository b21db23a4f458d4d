"""The one error the model loader raises, kept in a leaf module so every loader module can import it."""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """The base model could not be loaded: unknown preset, missing file or wheel, unsupported architecture.

    The message says what was asked for and what to do about it; the service prints it and exits at start-up.
    """

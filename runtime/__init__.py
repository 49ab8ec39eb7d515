"""Spanda runtime: loads an engine artifact and serves it. Never imports ``compiler``.

``from runtime import LLM, SamplingParams`` is the offline API. Names resolve lazily so that importing
``runtime.ops`` (as the compiler does) does not pull in the engine.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LLM": "runtime.llm",
    "LLMEngine": "runtime.engine",
    "EngineOptions": "runtime.config",
    "SamplingParams": "runtime.sampling_params",
    "RequestOutput": "runtime.request",
    "CompletionOutput": "runtime.request",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")

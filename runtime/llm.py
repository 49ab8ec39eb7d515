"""The offline API vLLM users know: ``LLM(path).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from runtime.config import EngineOptions
from runtime.engine import LLMEngine
from runtime.request import CompletionOutput, RequestOutput
from runtime.sampling_params import SamplingParams

Prompt = str | Sequence[int]


class LLM:
    """Load an artifact and generate for many prompts at once through the continuous-batching loop.

    Keyword arguments are :class:`runtime.config.EngineOptions` fields (device, kv_cache_blocks, ...).
    """

    def __init__(self, model: str | Path, **options):
        self.engine = LLMEngine(model, EngineOptions(**options))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Outputs in the order of ``prompts``. A prompt is text or a list of token ids."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params or SamplingParams()
        per = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(per) != len(prompts):
            raise ValueError(f"{len(per)} sampling params for {len(prompts)} prompts")
        order = []
        for prompt, p in zip(prompts, per):
            rid = str(next(self._ids))
            self.engine.add_request(rid, prompt, p)
            order.append(rid)
        done: dict[str, RequestOutput] = {}
        latest: dict[str, dict[int, CompletionOutput]] = {r: {} for r in order}
        with tqdm(total=len(order), desc="generating", unit="req", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    latest[out.request_id].update({c.index: c for c in out.outputs})
                    if out.finished:
                        comps = latest.pop(out.request_id)
                        out.outputs = [comps[i] for i in sorted(comps)]
                        done[out.request_id] = out
                        bar.update(1)
        return [done[r] for r in order]

    def chat(
        self,
        messages: Sequence[dict] | Sequence[Sequence[dict]],
        sampling_params: SamplingParams | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the artifact's chat template to one conversation or a list of them, then generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        # The template writes the special tokens itself (BOS included), so encode without adding any.
        prompts = [
            self.tokenizer.encode(
                self.tokenizer.apply_chat_template(list(c), add_generation_prompt=add_generation_prompt),
                add_special_tokens=False,
            )
            for c in convs
        ]
        return self.generate(prompts, sampling_params)

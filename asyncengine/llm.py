"""Offline batch API: LLM(...).generate(prompts, params) with a progress bar."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from asyncengine.config import EngineConfig
from asyncengine.engine_core import EngineCore
from asyncengine.outputs import CompletionResult
from asyncengine.sampling_params import InvalidRequestError, SamplingParams

Prompt = str | list[int]


class LLM:
    """Runs requests to completion on a synchronous EngineCore.

    LLM(model=None) uses the default model; keyword options are EngineConfig fields.
    """

    def __init__(self, model: str | None = None, config: EngineConfig | None = None, **options: Any) -> None:
        if config is None:
            config = EngineConfig(model=model, **options)
        elif model is not None or options:
            config = config.with_options(**({"model": model} if model is not None else {}), **options)
        self.engine = EngineCore(config)
        self.tokenizer = self.engine.tokenizer
        self._counter = 0

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt given as text or ids (text needs the model's tokenizer)."""
        return self.engine.encode(prompt)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat rendered with the tokenizer's chat template."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError("this model has no chat template", "messages")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[CompletionResult]:
        """Run all prompts together (continuous batching); results in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompt_list = list(prompts)  # type: ignore[arg-type]
        if params is None:
            params = SamplingParams()
        param_list = [params] * len(prompt_list) if isinstance(params, SamplingParams) else list(params)
        if len(param_list) != len(prompt_list):
            raise InvalidRequestError("one SamplingParams per prompt, or a single one for all", "params")
        results: dict[str, CompletionResult] = {}
        order: list[str] = []
        for prompt, sp in zip(prompt_list, param_list):
            rid = f"llm-{self._counter}"
            self._counter += 1
            ids = self.encode(prompt)
            self.engine.add_request(rid, ids, sp)
            results[rid] = CompletionResult(request_id=rid, prompt_token_ids=ids)
            order.append(rid)
        self._run(results, use_tqdm)
        return [results[rid] for rid in order]

    def _run(self, results: dict[str, CompletionResult], use_tqdm: bool) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(results), desc="generate", unit="req", disable=not use_tqdm)
        tokens = 0
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    results[out.request_id].add(out)
                    tokens += len(out.token_ids)
                    if out.finished:
                        bar.update(1)
                bar.set_postfix(tokens=tokens, refresh=False)
        except BaseException:
            # Leave the engine reusable: abort whatever this call left running.
            self.engine.abort(list(results))
            raise
        finally:
            bar.close()

"""asyncengine: an LLM inference engine for RL rollouts whose logprobs a trainer can trust."""
from __future__ import annotations

from asyncengine.config import EngineConfig
from asyncengine.outputs import CompletionResult, RequestOutput
from asyncengine.sampling_params import InvalidRequestError, SamplingParams

__version__ = "0.1.0"
__all__ = ["EngineConfig", "SamplingParams", "InvalidRequestError", "RequestOutput", "CompletionResult", "__version__"]

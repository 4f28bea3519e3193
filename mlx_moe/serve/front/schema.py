"""The OpenAI request bodies (chat and completions) as pydantic models, and
the error a request handler raises to answer with a status."""

from typing import Dict, List, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from .chat import ChatFields

DEFAULT_MAX_TOKENS = 512
MAX_N = 16  # choices per request (each is a sequence in the batch)


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class Sampling(BaseModel):
    # An unknown field is a 400 naming it, rather than a setting silently not applied.
    model_config = ConfigDict(extra="forbid")
    model: StrictStr
    max_tokens: Optional[StrictInt] = Field(None, gt=0)
    max_completion_tokens: Optional[StrictInt] = Field(None, gt=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: Optional[StrictInt] = None
    stop: Optional[Union[StrictStr, List[StrictStr]]] = None
    stop_token_ids: Optional[List[StrictInt]] = None  # vLLM's: token ids that end the answer
    logit_bias: Optional[Dict[StrictStr, float]] = None
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    user: Optional[StrictStr] = None  # accepted and ignored: no per-user accounting
    # Beyond OpenAI's fields, those of mlx-lm's and vLLM's servers (top_k,
    # min_p, repetition_penalty); penalties look back PENALTY_CONTEXT tokens.
    top_k: StrictInt = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)

    def top_logprobs_count(self) -> Optional[int]:
        """How many alternatives each token's log-probs list; None: no log-probs."""
        return None


class ChatRequest(Sampling, ChatFields):
    logprobs: StrictBool = False
    top_logprobs: Optional[StrictInt] = Field(None, ge=0, le=20)

    def top_logprobs_count(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true.", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(Sampling):
    # Text, or token ids; a list of them is several prompts, n choices each.
    prompt: Union[StrictStr, List[StrictInt], List[StrictStr], List[List[StrictInt]]]
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=5)

    def top_logprobs_count(self):
        return self.logprobs


def encode(tokenizer, prompt: str) -> List[int]:
    # The rule mlx_lm.stream_generate applies to a string prompt, so a
    # served prompt is tokenized exactly as a local generate would.
    add_special = tokenizer.bos_token is None or not prompt.startswith(tokenizer.bos_token)
    return list(tokenizer.encode(prompt, add_special_tokens=add_special))

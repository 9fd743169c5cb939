"""The OpenAI wire format, as pydantic models; nothing past the HTTP layer sees these.

Requests accept OpenAI's fields, vLLM's extras (top_k, min_tokens, ignore_eos, stop_token_ids,
return_token_ids) and Offramp's early-exit fields; unknown fields are ignored, as OpenAI and
vLLM do. Response fields that only appear on request (exit_layers, token_ids) are left out of
the JSON when unset.
"""
import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

# A list in a request stops at its first bad element: a million wrong elements must not cost a
# million error objects (pydantic validates holding the GIL, so the event loop would wait).
FAIL_FAST = Field(fail_fast=True)
TokenIds = Annotated[list[int], FAIL_FAST]
Texts = Annotated[list[str], FAIL_FAST]


def prompt_form(prompt) -> str | None:
    """Which form of prompt the client sent, judged by its first element, so that pydantic checks that
    form alone instead of trying each one on the whole list."""
    if isinstance(prompt, str):
        return "str"
    if not isinstance(prompt, list):
        return None
    return {str: "list[str]", list: "list[list[int]]"}.get(type(prompt[0]), "list[int]") if prompt else "list[int]"


Prompt = Annotated[
    Annotated[str, Tag("str")] | Annotated[Texts, Tag("list[str]")] | Annotated[TokenIds, Tag("list[int]")]
    | Annotated[list[TokenIds], FAIL_FAST, Tag("list[list[int]]")],
    Discriminator(prompt_form, custom_error_type="prompt_type",
                  custom_error_message="must be a string, a list of strings, token ids or lists of token ids")]


def _absent(value) -> bool:
    return value is None


def omit_if_none(**kwargs):
    """An optional response field, left out of the JSON when None."""
    return Field(default=None, exclude_if=_absent, **kwargs)


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    n: int = 1
    stop: str | Texts | None = None
    stop_token_ids: TokenIds | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    early_exit: bool = True  # False = every token at full depth
    exit_epsilon: float | None = None  # one of the head set's calibrated values; None = its default
    return_exit_layers: bool = False  # each choice gets exit_layers, one per generated token
    return_token_ids: bool = False  # each choice gets token_ids, the generated ids


class CompletionRequest(SamplingFields):
    prompt: Prompt
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False  # with logprobs, the prompt's tokens get logprobs too; with max_tokens 0, only they
    prompt_logprobs: int | None = None  # vLLM's: per prompt token its logprob and this many alternatives


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | Annotated[list[ContentPart], FAIL_FAST] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, fail_fast=True)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class ExitUsage(BaseModel):
    tokens_exited_early: int  # left before the last layer
    tokens_skipped_lm_head: int = 0  # answered by an exit head, the one after the last layer included
    mean_layers: float  # mean depth of the generated tokens, in decoder layers
    compute_saved: float  # 1 - decode FLOPs spent / at full depth, exit heads and KV fill included


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    exit: ExitUsage | None = omit_if_none()


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's Logprob: one entry of a prompt token's alternatives."""
    logprob: float
    rank: int | None = None  # 1 = most likely
    decoded_token: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    exit_layers: list[int] | None = omit_if_none()
    token_ids: list[int] | None = omit_if_none()
    # per prompt token (None first): {token id: its entry} for the token and its top alternatives
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = omit_if_none()


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = omit_if_none()


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    exit_layers: list[int] | None = omit_if_none()
    token_ids: list[int] | None = omit_if_none()


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = omit_if_none()


class DeltaMessage(BaseModel):
    role: str | None = omit_if_none()
    content: str | None = omit_if_none()


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = omit_if_none()
    exit_layers: list[int] | None = omit_if_none()
    token_ids: list[int] | None = omit_if_none()


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = omit_if_none()


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "offramp"
    root: str | None = None
    max_model_len: int | None = None
    exit_layers: list[int] = Field(default_factory=list)
    exit_epsilons: list[float] = Field(default_factory=list)
    default_exit_epsilon: float | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo

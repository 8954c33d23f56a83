"""Request bodies and the error shape of the OpenAI API (chat completions, completions), plus vLLM's extras.

Fields follow the OpenAI API reference (platform.openai.com/docs/api-reference); `top_k`
and `repetition_penalty` are vLLM's extra sampling parameters (the SDK's `extra_body`),
`add_special_tokens`/`prompt`/`tokens` are vLLM's `/tokenize` and `/detokenize` bodies.
Unknown fields are ignored, as OpenAI's and vLLM's servers do.
"""

from __future__ import annotations

from typing import Literal, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

MAX_STOP = 4  # OpenAI accepts up to 4 stop sequences
MAX_LOGPROBS = 5  # OpenAI's limit for /v1/completions `logprobs`


class APIError(Exception):
    """An error the API answers as `{"error": {message, type, param, code}}` with `status`."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             429: "rate_limit_error", 503: "service_unavailable", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """The controls both endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # OpenAI requires it; llama.cpp's server does not, nor do we
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # vLLM: -1 (or 0) keeps every token
    repetition_penalty: float = Field(1.0, gt=0)
    stop: Union[StrictStr, list[StrictStr], None] = None
    n: int = Field(1, ge=1)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise APIError(400, f"at most {MAX_STOP} stop sequences, got {len(stops)}", "stop")
        if "" in stops:
            raise APIError(400, "a stop sequence may not be empty", "stop")
        return tuple(stops)


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, list[TextPart], None] = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)  # OpenAI's newer name for max_tokens; wins if both
    logprobs: bool = False

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


TokenIds = list[StrictInt]


class CompletionRequest(_Sampling):
    # A string, a list of strings, token ids or a list of token-id lists (OpenAI's four prompt shapes).
    prompt: Union[StrictStr, list[StrictStr], TokenIds, list[TokenIds]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: StrictStr
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tokens: TokenIds


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One line from pydantic's errors, and the field it names (OpenAI's `param`)."""
    first = errors[0]
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('msg')}", None
    param = ".".join(where) or None
    return (f"{param}: {first.get('msg')}" if param else str(first.get("msg"))), param

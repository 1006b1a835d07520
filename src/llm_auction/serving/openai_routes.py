"""OpenAI-compatible completions for raw prompts: `/openai/v1/completions`, `/openai/v1/chat/completions`.

KServe registers these routes only for models of its vLLM-backed runtime (they import vllm), so the
CPU server has its own, with the wire format of the OpenAI API that the `openai` client speaks.
The policy is not a chat model: a chat request's messages are joined into one raw prompt.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llm_auction.config import describe_validation_error

if TYPE_CHECKING:
    from llm_auction.serving.server import AuctionModel

PREFIX = "/openai/v1"


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # the client sends fields we do not use (user, logit_bias...)

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=1024)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=8)
    seed: int | None = None
    stream: bool = False


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(min_length=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=1024)


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    """The OpenAI error body, which the client turns into its typed exceptions."""
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def openai_router(model: AuctionModel) -> APIRouter:
    router = APIRouter(prefix=PREFIX)

    def check(request: _Sampling) -> JSONResponse | None:
        if request.model != model.name:
            return _error(404, f"model: unknown model {request.model!r}; this server has {model.name!r}")
        if request.stream:
            return _error(400, "stream: streaming is not supported by this server")
        if model.served is None:
            return _error(503, "model: not loaded yet", "server_error")
        return None

    async def complete(
        prompts: list[str], request: _Sampling, max_tokens: int | None
    ) -> list[dict[str, Any]]:
        served = model.served
        assert served is not None
        cfg = served.generation.model_copy(
            update={
                "max_new_tokens": max_tokens or served.generation.max_new_tokens,
                # temperature 0 is greedy: keep only the most likely token (nucleus of mass ~0)
                "temperature": request.temperature or 1.0,
                "top_p": request.top_p if request.temperature > 0 else 1e-9,
            }
        )
        seed = request.seed if request.seed is not None else model.next_seed()
        repeated = [p for p in prompts for _ in range(request.n)]
        texts = await model.complete(repeated, seed, cfg)
        choices = []
        for i, text in enumerate(texts):
            tokens = served.prompt_tokens(text) if text else 0
            choices.append({"index": i, "text": text, "tokens": tokens, "limit": cfg.max_new_tokens})
        return choices

    def usage(prompts: list[str], choices: list[dict[str, Any]]) -> dict[str, int]:
        served = model.served
        assert served is not None
        prompt_tokens = sum(served.prompt_tokens(p) for p in prompts)
        completion = sum(c["tokens"] for c in choices)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }

    def finish(choice: dict[str, Any]) -> str:
        return "length" if choice["tokens"] >= choice["limit"] else "stop"

    async def accept(http: Request, schema: type[_Sampling]) -> Any:
        """The validated request, or the error response to send instead."""
        try:
            request = schema.model_validate_json(await http.body())
        except ValidationError as exc:
            return _error(400, describe_validation_error(exc, "invalid request"))
        return check(request) or request

    @router.post("/completions")
    async def completions(http: Request) -> Any:
        request = await accept(http, CompletionRequest)
        if not isinstance(request, CompletionRequest):
            return request
        prompts = [request.prompt] if isinstance(request.prompt, str) else list(request.prompt)
        choices = await complete(prompts, request, request.max_tokens)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model.name,
            "choices": [
                {"index": c["index"], "text": c["text"], "logprobs": None, "finish_reason": finish(c)}
                for c in choices
            ],
            "usage": usage(prompts, choices),
        }

    @router.post("/chat/completions")
    async def chat_completions(http: Request) -> Any:
        request = await accept(http, ChatRequest)
        if not isinstance(request, ChatRequest):
            return request
        prompt = "\n".join(m.content for m in request.messages)
        choices = await complete([prompt], request, request.max_completion_tokens or request.max_tokens)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model.name,
            "choices": [
                {
                    "index": c["index"],
                    "message": {"role": "assistant", "content": c["text"]},
                    "finish_reason": finish(c),
                    "logprobs": None,
                }
                for c in choices
            ],
            "usage": usage([prompt], choices),
        }

    @router.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model.name, "object": "model", "owned_by": "llm-auction"}]}

    return router

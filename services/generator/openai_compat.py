"""The OpenAI side of the generator: every `/v1/completions` parameter is either honoured or refused with a 4xx that
names it (never ignored), the legacy `logprobs` object, and OpenAI's `param` / `code` error fields.

Log-probabilities are the model's own (log-softmax of its raw logits, vLLM's default): they do not change with
temperature, top-k / top-p / min-p, penalties or logit_bias, and greedy decoding (temperature 0) still reports them.
`top_logprobs` holds the `logprobs` most likely tokens plus the chosen one (so up to logprobs + 1, as OpenAI says).
Token strings are each token decoded alone (a token holding part of a UTF-8 character reads as U+FFFD);
`text_offset` adds up their lengths from the start of the choice's text (the prompt's, with echo).
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from services.generator.engine import SamplingParams, TokenLogprob, sampling_params
from shared.errors import ApiError
from shared.schemas import CompletionRequest
from shared.server import request_id

SUPPORTED = tuple(CompletionRequest.model_fields)


class OpenAIError(ApiError):
    """An ApiError that also names the request field at fault (`param`) and a machine-readable `code`, as OpenAI's
    errors do."""

    def __init__(self, status: int, type: str, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(status, type, message, headers)
        self.param, self.code = param, code


async def openai_error_handler(_: Request, exc: OpenAIError) -> JSONResponse:
    error = {"type": exc.type, "message": exc.message, "param": exc.param, "code": exc.code}
    if (rid := request_id.get()) is not None:
        error["request_id"] = rid
    return JSONResponse({"error": error}, status_code=exc.status, headers=exc.headers)


def _refuse(param: str, message: str, status: int = 400, code: str = "unsupported_parameter") -> OpenAIError:
    return OpenAIError(status, "invalid_request", message, param=param, code=code)


def check_request(req: CompletionRequest) -> None:
    """Refuse what this server does not do (400) and combinations that make no sense (422), before any work."""
    if unknown := sorted(req.model_extra or {}):
        names = ", ".join(repr(name[:64]) for name in unknown[:5])
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise _refuse(unknown[0][:64], f"Unrecognized request argument supplied: {names}{more}. This server "
                      f"supports: {', '.join(SUPPORTED)}")
    if req.suffix:
        raise _refuse("suffix", "suffix is not supported: the policy only continues text; omit it")
    if req.best_of not in (None, 1, req.n):
        raise _refuse("best_of", f"best_of {req.best_of} is not supported: candidates are not ranked; omit best_of "
                      "or set it to n")
    if req.stream_options is not None and not req.stream:
        raise _refuse("stream_options", "stream_options is only allowed with stream: true",
                      code="invalid_value")
    if req.max_tokens == 0 and not req.echo:
        raise _refuse("max_tokens", "max_tokens 0 needs echo: true (score the prompt); else ask for at least 1",
                      422, "invalid_value")
    if req.min_tokens > req.max_tokens:
        raise _refuse("min_tokens", f"min_tokens {req.min_tokens} exceeds max_tokens {req.max_tokens}", 422,
                      "invalid_value")


def completion_params(req: CompletionRequest) -> SamplingParams:
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    bias = tuple(sorted((int(token), float(value)) for token, value in (req.logit_bias or {}).items()))
    return sampling_params(
        req.max_tokens, req.temperature, req.top_p, max(req.top_k, 0), req.seed, req.n, stop,
        min_p=req.min_p, repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, min_tokens=req.min_tokens, logit_bias=bias,
        logprobs=req.logprobs, prompt_logprobs=req.echo and req.logprobs is not None)


def check_vocab(params: SamplingParams, vocab_size: int) -> None:
    if bad := [token for token, _ in params.logit_bias if token >= vocab_size]:
        raise _refuse("logit_bias", f"logit_bias names token {bad[0]}, past this model's vocabulary of "
                      f"{vocab_size}", 400, "invalid_value")


class LogprobsWriter:
    """One choice's legacy `logprobs` object, whole or chunk by chunk (text offsets carry on across chunks)."""

    def __init__(self, tokenizer, start: int = 0):
        self.tokenizer, self.offset = tokenizer, start

    def render(self, entries: list[TokenLogprob]) -> dict:
        ids = list(dict.fromkeys([e.token for e in entries] + [t for e in entries for t, _ in e.top]))
        text = dict(zip(ids, self.tokenizer.batch_decode([[i] for i in ids]))) if ids else {}
        tokens = [text[e.token] for e in entries]
        offsets = []
        for token in tokens:
            offsets.append(self.offset)
            self.offset += len(token)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [None if e.logprob is None else _top(e, text) for e in entries],
                "text_offset": offsets}


def _top(entry: TokenLogprob, text: dict[int, str]) -> dict[str, float]:
    top: dict[str, float] = {}
    for token, logprob in entry.top:
        top.setdefault(text[token], logprob)
    top.setdefault(text[entry.token], entry.logprob)  # the chosen token is always there
    return top


def echoed(prompt: str, scored: list[TokenLogprob] | None) -> list[TokenLogprob]:
    """The prompt's scored tokens as echoed: none for an empty prompt (its BOS is ours, not the client's)."""
    return list(scored or []) if prompt else []

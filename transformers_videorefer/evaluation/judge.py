"""Chat judges for VideoRefer-Bench-D: any OpenAI-compatible endpoint, or a local transformers causal LM."""

import email.utils
import http.client
import json
import logging
import random
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Protocol

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


logger = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
CONFIGURATION_STATUS = frozenset({401, 403, 404})


class JudgeError(RuntimeError):
    """The judge gave no usable reply for one item (after its retries); that item is reported as failed."""


class JudgeConfigurationError(RuntimeError):
    """The endpoint refuses every request (bad key, unknown model or URL): stop instead of failing each item."""


class ChatJudge(Protocol):
    """Anything that answers a chat: `complete(messages)` returns the reply text or raises `JudgeError`."""

    name: str

    def complete(self, messages: list[dict]) -> str: ...


def _retry_after_seconds(value: str | None) -> float | None:
    """Seconds a `Retry-After` header asks to wait (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class _RetryableError(Exception):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


class OpenAICompatibleJudge:
    """
    A judge behind `POST {base_url}/chat/completions` (OpenAI, vLLM, SGLang, LiteLLM, ...), called with the standard
    library. Connection errors, timeouts, malformed responses, 408/409/425/429 and 5xx are retried with exponential
    backoff and jitter (a `Retry-After` header is honoured, up to `max_retry_after` seconds), at most `max_attempts`
    requests per call; other 4xx fail the item at once, and 401/403/404 raise `JudgeConfigurationError`.

    Args:
        base_url (`str`): the API root, e.g. `https://api.openai.com/v1` or `http://127.0.0.1:8000/v1`.
        model (`str`): the model name the endpoint serves.
        api_key (`str`, *optional*): sent as a bearer token when given.
        temperature (`float`, defaults to 0.0): sampling temperature (0 makes the judge repeatable).
        max_tokens (`int`, defaults to 800): the longest reply.
        max_attempts (`int`, defaults to 6): requests per call before the item fails.
        timeout (`float`, defaults to 120): seconds to wait for one response.
        backoff_base (`float`, defaults to 1.0): the first retry waits about this long; each further one doubles.
        backoff_max (`float`, defaults to 60): the longest wait between attempts without `Retry-After`.
        max_retry_after (`float`, defaults to 300): the longest `Retry-After` wait honoured.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        temperature: float = 0.0,
        max_tokens: int = 800,
        max_attempts: int = 6,
        timeout: float = 120.0,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        max_retry_after: float = 300.0,
    ):
        if not base_url or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL such as http://127.0.0.1:8000/v1, got {base_url!r}")
        if not model:
            raise ValueError("model must name the judge model the endpoint serves")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.name = model
        self.api_key = api_key
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_attempts = max_attempts
        self.timeout = timeout
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_retry_after = max_retry_after

    def _post(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            detail = error.read(500).decode("utf-8", "replace").strip()
            reason = f"HTTP {error.code} from {self.url}: {detail or error.reason}"
            if error.code in CONFIGURATION_STATUS:
                raise JudgeConfigurationError(f"{reason}; check the judge base URL, model name and API key") from error
            if error.code in RETRYABLE_STATUS or error.code >= 500:
                raise _RetryableError(reason, _retry_after_seconds(error.headers.get("Retry-After"))) from error
            raise JudgeError(reason) from error
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as error:
            raise _RetryableError(f"cannot reach {self.url}: {getattr(error, 'reason', error)}") from error
        try:
            content = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise _RetryableError(f"malformed response from {self.url}: {payload[:200]!r}") from error
        if isinstance(content, list):  # content parts, as some servers return them
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str):
            raise _RetryableError(f"the response from {self.url} has no text content: {payload[:200]!r}")
        return content

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        ceiling = min(self.backoff_max, self.backoff_base * 2**attempt)
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def complete(self, messages: list[dict]) -> str:
        body = json.dumps(
            {"model": self.name, "messages": messages, "temperature": self.temperature, "max_tokens": self.max_tokens}
        ).encode("utf-8")
        attempt = 0
        while True:
            try:
                return self._post(body)
            except _RetryableError as error:
                attempt += 1
                if attempt == self.max_attempts:
                    raise JudgeError(f"gave up after {self.max_attempts} attempts; last error: {error}") from error
                delay = self._backoff(attempt - 1, error.retry_after)
                logger.info("judge request failed (%s); retrying in %.1fs", error, delay)
                time.sleep(delay)


class LocalTransformersJudge:
    """
    A judge run in-process: a transformers causal LM (with a chat template) loaded from a local folder or hub id,
    decoding greedily. Calls are serialised, so a thread pool may share one instance.
    """

    def __init__(self, model_path: str, max_new_tokens: int = 800, dtype: str = "auto", device: str | None = None):
        self.name = str(model_path)
        self.max_new_tokens = max_new_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if self.tokenizer.chat_template is None:
            raise ValueError(f"the local judge {model_path!r} has no chat template; use an instruction-tuned model")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device).eval()
        self._lock = threading.Lock()

    def complete(self, messages: list[dict]) -> str:
        inputs = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(self.device)
        with self._lock, torch.inference_mode():
            output = self.model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=(
                    self.tokenizer.pad_token_id
                    if self.tokenizer.pad_token_id is not None
                    else self.tokenizer.eos_token_id
                ),
            )
        return self.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

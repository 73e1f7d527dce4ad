"""``openai``: any OpenAI-compatible chat endpoint over plain HTTP (stdlib ``urllib``)."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from typing import Any

from project.judges.base import ChatJudge

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# openai


class OpenAIJudge(ChatJudge):
    """Any OpenAI-compatible ``/chat/completions`` endpoint over plain HTTP (temperature 0).

    Failed requests (connection errors, HTTP 429 / 5xx) are retried with exponential backoff;
    after ``max_retries`` the call counts as a parse failure instead of stopping the eval.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None,
        *,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        max_concurrency: int = 8,
        max_tokens: int = 256,
    ) -> None:
        super().__init__()
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._api_key = api_key
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.max_concurrency = max_concurrency
        self.max_tokens_rate = max_tokens

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def probe(self, timeout_s: float) -> None:
        """Raise ValueError unless ``GET {base}/models`` answers (404/405 count as reachable:
        some servers do not list models) and accepts the key."""
        request = urllib.request.Request(f"{self.base_url}/models", headers=self._headers())
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                body = response.read()
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise ValueError(
                    f"judge endpoint {self.base_url!r} rejected the API key (HTTP {e.code}); "
                    "set OPENAI_API_KEY (or the variable named by api_key_env)"
                ) from e
            if e.code in (404, 405):
                logger.info("judge endpoint %s does not list models; continuing", self.base_url)
                return
            raise ValueError(f"judge endpoint {self.base_url!r} answered HTTP {e.code}") from e
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ValueError(
                f"judge endpoint {self.base_url!r} is unreachable ({reason}); set base_url or "
                "OPENAI_BASE_URL to a running OpenAI-compatible server"
            ) from e
        try:
            listed = {m.get("id") for m in json.loads(body).get("data", [])}
        except (ValueError, AttributeError):
            return
        if listed and self.model not in listed:
            logger.warning(
                "judge endpoint %s does not list model %r (it lists %s)",
                self.base_url,
                self.model,
                sorted(str(m) for m in listed)[:10],
            )

    def _chat(self, messages: list[dict[str, str]], max_tokens: int) -> str | None:
        payload = json.dumps(
            {
                "model": self.model,
                "messages": messages,
                "temperature": 0,
                "max_tokens": max_tokens,
            }
        ).encode()
        url = f"{self.base_url}/chat/completions"
        error: str = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(30.0, 0.5 * 2**attempt))
            request = urllib.request.Request(url, data=payload, headers=self._headers())
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    data = json.loads(response.read())
                return str(data["choices"][0]["message"]["content"] or "")
            except urllib.error.HTTPError as e:
                error = f"HTTP {e.code}"
                if e.code != 429 and e.code < 500:
                    break  # a client error does not go away by retrying
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (ValueError, KeyError, IndexError, TypeError) as e:
                error = f"malformed response ({e})"
                break
        logger.error("judge request to %s failed: %s", url, error)
        return None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "base_url": self.base_url}

    def identity(self) -> dict[str, str]:
        return {
            "kind": self.name,
            "model": self.model,
            "endpoint": self.base_url,
            "temperature": "0",
            "calibration": "",
        }

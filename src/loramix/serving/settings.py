"""The settings of one `loramix serve` run (what to load, where to listen, the server's limits), checked once, here,
with errors naming the command-line flag."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from ..checks import is_int

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


def check_count(value, name: str, low: int, high: int | None = None) -> None:
    """`value` an integer (not a bool) of at least `low` (and at most `high`); ValueError naming `name`."""
    if is_int(value) and value >= low and (high is None or value <= high):
        return
    bound = f"at least {low}" if high is None else f"between {low} and {high}"
    raise ValueError(f"{name} must be {bound}, got {value!r}")


def check_api_key(key) -> None:
    """An API key is None (no key) or text a client can send: not empty, not blank, no whitespace at its ends (an
    `Authorization` header's value is trimmed) and no control or other non-printing characters; ValueError naming
    --api-key. An empty key, from an unset environment variable say, would otherwise accept `Authorization: Bearer`
    with nothing after it."""
    if key is None:
        return
    if not isinstance(key, str):
        raise ValueError(f"--api-key must be text, got {type(key).__name__}")
    if not key.strip():
        raise ValueError("--api-key must not be empty or blank (an unset environment variable?); leave the flag "
                         "out to serve without a key")
    if key != key.strip():
        raise ValueError("--api-key must not start or end with whitespace (a client's header could never match it)")
    if not key.isprintable():
        raise ValueError("--api-key must not hold control or other non-printing characters")


@dataclass(frozen=True)
class ServeSettings:
    """How `loramix serve` runs. Every field is a flag of the verb (`--max-batch` is `max_batch`); a bad value is a
    ValueError naming the flag, raised on construction, before anything loads. How the base is placed (dtype,
    quantization, device map) is the loader's, shared with the other verbs: `load_state` takes it beside these."""

    model: str  # --model: the X-LoRA checkpoint folder or hub id
    base: str | None = None  # --base: the base model (default: the checkpoint's base_model_id)
    served_model_name: str | None = None  # --served-model-name: the model id clients use (default: model's folder)
    chat_template: str | None = None  # --chat-template: a Jinja file replacing the tokenizer's chat template
    trust_remote_code: bool = False  # --trust-remote-code: run the base model's own code
    host: str = "127.0.0.1"  # --host: the address to bind (0.0.0.0: every interface)
    port: int = 8000  # --port
    api_key: str | None = None  # --api-key: `Authorization: Bearer KEY` required on every route but /health
    log_level: str = "info"  # --log-level: uvicorn's, one of LOG_LEVELS
    max_batch: int = 8  # --max-batch: rows (prompt x choice) decoded together
    max_queue: int = 64  # --max-queue: rows waiting beyond the batch; a request that does not fit gets 429
    max_tokens_cap: int = 1024  # --max-tokens-cap: the largest max_tokens a request may ask for
    max_request_bytes: int = 1 << 20  # --max-request-bytes: larger request bodies get 413
    # --max-logprob-entries: the most log-probability entries one answer may hold, counted as
    # (echoed prompt tokens + max_tokens) x (1 + logprobs) summed over its choices; beyond it a request gets 400.
    # The default holds lm-eval's log-likelihood requests (echo, max_tokens 1, logprobs 1) of 32 prompts at a
    # 4,096-token context: 4,096 x 32 x 2
    max_logprob_entries: int = 1 << 18
    # --speculate: at most N tokens drafted with frozen scalings per verification (exact self-speculative
    # decoding, engine/speculative.py); 0: one token per row per step through both passes
    speculate: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"--model must name a checkpoint folder or hub id, got {self.model!r}")
        check_count(self.port, "--port", 1, 65535)
        check_count(self.max_batch, "--max-batch", 1)
        check_count(self.max_queue, "--max-queue", 0)
        check_count(self.max_tokens_cap, "--max-tokens-cap", 1)
        check_count(self.max_request_bytes, "--max-request-bytes", 1)
        check_count(self.max_logprob_entries, "--max-logprob-entries", 1)
        check_count(self.speculate, "--speculate", 0, 64)
        check_api_key(self.api_key)
        self.read_chat_template()
        if not isinstance(self.host, str) or not self.host:
            raise ValueError("--host must not be empty (0.0.0.0 listens on every interface)")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")

    @property
    def model_name(self) -> str:
        """The model id clients name: --served-model-name, else the checkpoint's folder name."""
        return self.served_model_name or os.path.basename(os.path.normpath(self.model))

    @property
    def max_rows(self) -> int:
        """The rows (prompts x n) the engine holds at once, running and waiting: one request may ask for no more."""
        return self.max_batch + self.max_queue

    def read_chat_template(self) -> str | None:
        """The --chat-template file's text (None without one); ValueError naming the flag if it cannot be read."""
        path = self.chat_template
        if path is None:
            return None
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            raise ValueError(f"--chat-template: no such file: {path}") from None
        except UnicodeDecodeError:
            raise ValueError(f"--chat-template: {path} is not UTF-8 text") from None
        except OSError as e:
            raise ValueError(f"--chat-template: cannot read {path}: {e.strerror}") from None

    def probe_address(self) -> None:
        """The host resolves and the port is free now, not after minutes of loading; ValueError naming the flag."""
        try:
            family, kind, proto, _, address = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0]
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
        except (socket.gaierror, UnicodeError) as e:
            raise ValueError(f"--host {self.host!r} is not an address or a known host name ({e})") from None
        except OSError as e:
            raise ValueError(f"--host/--port: cannot listen on {self.host}:{self.port}: {e.strerror or e}") from None

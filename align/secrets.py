"""Credentials: which values are secret, and a copy of anything with them replaced by '***'.

Every writer of run files (recipe.yaml, model cards, tracker configs) redacts through here, so a token in the
environment or under a credential-like key never reaches the run directory.
"""

from __future__ import annotations

import os
import re
from typing import Any

# Credentials that must never reach the run directory, whatever key they hide under.
SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY")
SECRET_NAME = re.compile(r"(token|key|secret|password|passwd)", re.IGNORECASE)
# Names that hold "token"/"key" but are ordinary settings, not credentials.
NOT_SECRET = re.compile(
    r"^((pad|eos|bos|unk|sep|cls|mask)_token(_id)?|.*tokens?_.*|.*_tokens|.*tokenizer.*|max_tokens|key_.*)$"
)


def secret_values() -> list[str]:
    """The values of the environment's credentials: the known names, and any name with TOKEN, SECRET or PASSWORD."""
    names = set(SECRET_ENV) | {k for k in os.environ if any(w in k.upper() for w in ("TOKEN", "SECRET", "PASSWORD"))}
    return [os.environ[k] for k in names if os.environ.get(k)]


def redact(node: Any, secrets: list[str] | None = None) -> Any:
    """A copy with credential-like keys' values and any known secret value replaced by '***'."""
    secrets = [s for s in (secrets or []) if s and len(s) >= 4]
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if SECRET_NAME.search(str(k)) and not NOT_SECRET.match(str(k)) and isinstance(v, str | int | float):
                out[k] = "***"
            else:
                out[k] = redact(v, secrets)
        return out
    if isinstance(node, list):
        return [redact(v, secrets) for v in node]
    if isinstance(node, str):
        for s in secrets:
            node = node.replace(s, "***")
    return node

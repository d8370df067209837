"""Credentials: which values are secret, and a copy of anything with them replaced by '***'.

Every writer of run files (recipe.yaml, model cards, tracker configs) redacts through here, so a token in the
environment or under a credential key never reaches the run directory.

A name is judged by its words, never by a substring: `num_key_value_heads`, `pad_token` and `max_new_tokens` are
settings that a saved recipe must keep (one redacted to '***' no longer runs), while `hub_token`, `api_key` and
`password` are credentials.
"""

from __future__ import annotations

import os
import re
from typing import Any

# A name whose last word is one of these is a credential, whatever comes before it ("pwd" is not one: $PWD is the
# working directory, which would be struck from every path).
ALWAYS_SECRET = frozenset({"secret", "password", "passwd", "passphrase", "apikey", "credential", "credentials"})
# "token" and "key" name credentials only with a word that says so before them: models are full of other tokens and
# keys (pad_token, image_token_id, key_bias, share_att_key).
QUALIFIED = frozenset({"token", "key"})
QUALIFIERS = frozenset({
    "api", "access", "auth", "authentication", "authorization", "bearer", "refresh", "session", "secret", "private",
    "client", "personal", "hub", "hf", "huggingface", "wandb", "openai", "anthropic", "github", "gh", "gitlab",
    "slack", "signing", "encryption", "license", "service", "account", "mlflow", "comet", "neptune", "aws", "azure",
    "gcp", "s3",
})  # fmt: skip


def words(name: str) -> list[str]:
    """A key's or variable's words, lower case: split at `_`, `-`, `.` and camelCase humps."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name)
    return [w for w in re.split(r"[_\-.\s]+", spaced.lower()) if w]


def is_credential_name(name: str) -> bool:
    """Whether a recipe key names a credential: its last word is a credential word (`password`, `secret`), or `token`
    / `key` with a credential word before it (`hub_token`, `api_key`, `accessToken`), or the name is `token` alone
    (the hub's keyword for one)."""
    parts = words(str(name))
    if not parts:
        return False
    last = parts[-1]
    if last in ALWAYS_SECRET:
        return True
    return last in QUALIFIED and (parts == ["token"] or any(w in QUALIFIERS for w in parts[:-1]))


def is_credential_variable(name: str) -> bool:
    """Whether an environment variable holds a credential: one whose last word is TOKEN or KEY, or with a credential
    word anywhere (GITHUB_TOKEN, MY_SERVICE_PASSWORD, DB_SECRET_VALUE; not TOKENIZERS_PARALLELISM, whose 'false' would
    otherwise be struck from every string)."""
    parts = words(name)
    return bool(parts) and (parts[-1] in QUALIFIED or any(w in ALWAYS_SECRET for w in parts))


def secret_values() -> list[str]:
    """The values of the environment's credentials (`is_credential_variable`)."""
    return [value for name, value in os.environ.items() if value and is_credential_variable(name)]


def redact(node: Any, secrets: list[str] | None = None) -> Any:
    """A copy with credential keys' values (`is_credential_name`; text or numbers, never a switch like
    `use_auth_token: true`) and any known secret value replaced by '***'."""
    secrets = [s for s in (secrets or []) if s and len(s) >= 4]
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if is_credential_name(str(k)) and isinstance(v, str | int | float) and not isinstance(v, bool):
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

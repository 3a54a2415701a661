"""Ray token authentication (on by default in Ray 2.60), as the biflow CLI sees it.

Ray looks for the token in this order, and so do we:

    RAY_AUTH_TOKEN         the token itself
    RAY_AUTH_TOKEN_PATH    a file holding it
    ~/.ray/auth_token      the default file (`ray get-auth-token --generate` writes it)

`--token` on the command line comes first. RAY_AUTH_MODE=disabled means "send nothing" (a cluster
started with authentication off), except a token given with --token. The dashboard (job submission,
state API, logs) takes it as `Authorization: Bearer <token>`; Ray's own `ray job submit` and
`ray status` read the same variables, so one `export RAY_AUTH_TOKEN=...` serves both.
The token never goes into a job's runtime environment: the job's driver runs on the head, which
has the cluster's token already.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from biflow.errors import UserError

TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
MODE_ENV = "RAY_AUTH_MODE"
DEFAULT_TOKEN_FILE = "~/.ray/auth_token"
HEADER = "Authorization"  # Ray also accepts X-Ray-Authorization (for proxies that consume Authorization)


@dataclass(frozen=True)
class Token:
    value: str
    source: str  # where it came from, for messages: "--token", "$RAY_AUTH_TOKEN" or a file path

    def __repr__(self) -> str:  # never print the secret
        return f"Token(from {self.source})"


def _read(path: Path, what: str) -> str:
    try:
        value = path.read_text().strip()
    except OSError as err:
        raise UserError(f"{what} {path}: cannot read the Ray auth token ({err.strerror})") from None
    if not value:
        raise UserError(f"{what} {path} is empty: it should hold the cluster's Ray auth token")
    return value


def find_token(explicit: str | None = None, env: Mapping[str, str] = os.environ) -> Token | None:
    """The token to send, or None (no token anywhere, or RAY_AUTH_MODE=disabled)."""
    if explicit:
        return Token(explicit.strip(), "--token")
    if env.get(MODE_ENV, "").strip().lower() == "disabled":
        return None
    if env.get(TOKEN_ENV, "").strip():
        return Token(env[TOKEN_ENV].strip(), f"${TOKEN_ENV}")
    if env.get(TOKEN_PATH_ENV):
        path = Path(env[TOKEN_PATH_ENV]).expanduser()
        if not path.is_file():
            raise UserError(f"{TOKEN_PATH_ENV}={env[TOKEN_PATH_ENV]}: no such file")
        return Token(_read(path, TOKEN_PATH_ENV), str(path))
    path = (Path(env["HOME"]) if env.get("HOME") else Path.home()) / ".ray" / "auth_token"
    if path.is_file():
        return Token(_read(path, "token file"), str(path))
    return None


def headers(token: Token | None) -> dict[str, str]:
    return {HEADER: f"Bearer {token.value}"} if token else {}


HOW_TO = (f"pass --token, set {TOKEN_ENV} (or {TOKEN_PATH_ENV}), or put it in {DEFAULT_TOKEN_FILE}; "
          "on the head, `ray get-auth-token` prints it")

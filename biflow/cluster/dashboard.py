"""The Ray head's HTTP API (the dashboard, port 8265): job submission, nodes, tasks, with one-line errors.

Everything `biflow submit` asks the cluster goes through here: an address normalised to
http://HOST:PORT, the auth header, and the three failures a user meets first turned into one line
each: nothing listening, no token, a wrong token.
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

from biflow.cluster import auth
from biflow.errors import UserError, first_line

DEFAULT_ADDRESS = "http://127.0.0.1:8265"


class ClusterError(UserError):
    """The cluster cannot be reached or refuses us, as one line."""


def resolve_address(address: str | None, env: Mapping[str, str] = os.environ) -> str:
    """--address, else $RAY_API_SERVER_ADDRESS, else an http $RAY_ADDRESS, else http://127.0.0.1:8265 (no trailing /)."""
    if not address:
        address = env.get("RAY_API_SERVER_ADDRESS") or (
            env["RAY_ADDRESS"] if env.get("RAY_ADDRESS", "").startswith(("http://", "https://")) else DEFAULT_ADDRESS)
    address = address.strip().rstrip("/")
    if address.startswith("ray://"):
        raise ClusterError(f"--address {address}: that is a Ray Client address; jobs are submitted to the dashboard, "
                           "e.g. http://HEAD:8265")
    if "://" not in address:
        address = f"http://{address}"
    parsed = urllib.parse.urlparse(address)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ClusterError(f"--address {address}: expected the dashboard address, e.g. http://HEAD:8265")
    return address


class Dashboard:
    """One cluster's HTTP API: `get` for the REST endpoints, `jobs` for Ray's JobSubmissionClient."""

    def __init__(self, address: str | None = None, token: auth.Token | None = None, timeout: float = 10.0):
        self.address = resolve_address(address)
        self.token = token
        self.timeout = timeout
        self._jobs = None

    @property
    def headers(self) -> dict[str, str]:
        return auth.headers(self.token)

    # ------------------------------------------------------------------ raw HTTP
    def get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        """GET a JSON endpoint (e.g. /api/version, /api/v0/nodes); errors become one-line ClusterErrors."""
        url = f"{self.address}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params, doseq=True)
        request = urllib.request.Request(url, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            raise self._http_error(err.code, err.read().decode(errors="replace")) from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            reason = getattr(reason, "strerror", None) or str(reason)
            raise ClusterError(f"the Ray dashboard at {self.address} is unreachable ({reason}); start the head "
                               "(`ray start --head --dashboard-host=...` or `docker compose up`) or pass --address") from None

    def _http_error(self, status: int, body: str) -> ClusterError:
        body = " ".join(body.split())[:160]
        if status == 401:
            return ClusterError(f"the Ray cluster at {self.address} requires an auth token (token authentication "
                                f"is on): {auth.HOW_TO}")
        if status == 403:
            return ClusterError(f"the Ray cluster at {self.address} rejected the auth token from "
                                f"{self.token.source if self.token else '?'}: it is not this cluster's token ({auth.HOW_TO})")
        return ClusterError(f"the Ray dashboard at {self.address} answered HTTP {status}: {body}")

    def check(self) -> dict[str, Any]:
        """Reachable, token accepted; returns the head's versions ({'ray_version': ..., ...})."""
        return self.get("/api/version") or {}  # behind the token check when auth is on

    # ----------------------------------------------------------------- state API
    def _list(self, resource: str, filters: list[tuple[str, str, str]] = (), limit: int = 10_000) -> list[dict]:
        params: dict[str, Any] = {"limit": limit, "detail": "true"}
        if filters:
            params["filter_keys"] = [f[0] for f in filters]
            params["filter_predicates"] = [f[1] for f in filters]
            params["filter_values"] = [f[2] for f in filters]
        data = self.get(f"/api/v0/{resource}", params)
        try:
            return list(data["data"]["result"]["result"])
        except (KeyError, TypeError):
            raise ClusterError(f"the Ray dashboard at {self.address} answered /api/v0/{resource} with an unexpected "
                               f"shape (is it Ray 2.60?)") from None

    def nodes(self, alive_only: bool = True) -> list[dict]:
        """[{node_id, node_ip, is_head_node, state, resources_total, ...}] of the cluster's nodes."""
        nodes = self._list("nodes")
        return [n for n in nodes if n.get("state") == "ALIVE"] if alive_only else nodes

    def tasks(self, filters: list[tuple[str, str, str]] = ()) -> list[dict]:
        return self._list("tasks", filters)

    def actors(self, filters: list[tuple[str, str, str]] = ()) -> list[dict]:
        return self._list("actors", filters)

    # ---------------------------------------------------------------------- jobs
    @property
    def jobs(self):
        """ray.job_submission.JobSubmissionClient for this address, with the auth header."""
        if self._jobs is None:
            from ray.job_submission import JobSubmissionClient

            self.check()  # the clear errors first; the client's own are multi-line
            try:
                self._jobs = JobSubmissionClient(self.address, headers=self.headers)
            except Exception as err:  # noqa: BLE001 - e.g. a version mismatch with the head
                raise ClusterError(f"cannot use the job API at {self.address}: {first_line(err)}") from None
        return self._jobs

"""A driver joining a Ray cluster that has token authentication on: one line, before ray.init.

What Ray does here (read from the installed ray 2.60: `ray/_private/worker.py` `init`,
`ray/_private/authentication/authentication_token_setup.py`, and the C++ token loader's messages in
`_raylet.so`):

- A driver sends a token only when its own environment says `RAY_AUTH_MODE=token`. With an explicit
  address (the argument, `--ray-address`, or `RAY_ADDRESS`) Ray never switches the mode on for it, even
  when a token file exists; only `address="auto"` does that.
- The token comes from, in this order: the `RAY_AUTH_TOKEN` variable, the file `RAY_AUTH_TOKEN_PATH`
  names, `~/.ray/auth_token` (`ray start` writes it on the head; `ray get-auth-token` prints it).
- `RAY_AUTH_MODE=token` and no token anywhere: `ray.init` raises `AuthenticationError` at once, as a
  long traceback.
- No token sent (the mode not set), or a token that is not the cluster's: the GCS answers
  UNAUTHENTICATED and Ray's GCS client asks again once a second, logging a warning each time, for
  about 20 s, then `ray.init` raises `ConnectionError: Failed to connect to Ray cluster`.

`token_problem` asks the cluster's GCS once, with exactly what `ray.init` would send (a `GetClusterId`
call, a few seconds at most), and returns one line saying what is missing and how to fix it, or ""
when the token is fine or the answer is something else (an address that does not answer is left to
`ray.init`, which says so itself).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
WHERE = (f"{TOKEN_ENV}=<token>, a file named by {TOKEN_PATH_ENV}, or ~/.ray/auth_token "
         "(`ray get-auth-token` on the head prints the cluster's token)")


class RayTokenError(ValueError):
    """The driver cannot authenticate to the Ray cluster it was told to join (a user error: one line)."""


def default_token_file(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    home = env.get("HOME")
    return (Path(home) if home else Path.home()) / ".ray" / "auth_token"


def driver_token(env: Mapping[str, str] | None = None) -> tuple[str | None, str]:
    """(the token Ray's loader would find, where it found it), or (None, "") when there is none."""
    env = os.environ if env is None else env
    token = (env.get(TOKEN_ENV) or "").strip()
    if token:
        return token, TOKEN_ENV
    named = env.get(TOKEN_PATH_ENV)
    if named:
        token = _read(Path(named).expanduser())
        if token:
            return token, f"{TOKEN_PATH_ENV}={named}"
    path = default_token_file(env)
    token = _read(path)
    return (token, str(path)) if token else (None, "")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return ""


def gcs_address(address: str | None) -> str | None:
    """The `host:port` a driver would dial for `address`, or None for what is not one ("auto",
    "local", a ray:// client address, an http:// dashboard address, nothing)."""
    if not address or "://" in address or address in ("auto", "local"):
        return None
    host, _, port = address.strip().rpartition(":")
    return address.strip() if host and port.isdigit() else None


def probe(address: str, token: str | None, timeout: float = 5.0) -> str:
    """Ask the GCS at `address` for its cluster id, sending `token` the way Ray's clients do.
    "ok", "unauthenticated", or "other: <gRPC status>" (unreachable, another Ray version...)."""
    try:
        import grpc
        from ray._private.authentication.authentication_constants import (
            AUTHORIZATION_BEARER_PREFIX,
            AUTHORIZATION_HEADER_NAME,
        )
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError as e:  # a Ray without token authentication: nothing to check
        return f"other: {e}"
    meta = [(AUTHORIZATION_HEADER_NAME, f"{AUTHORIZATION_BEARER_PREFIX}{token}")] if token else None
    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout, metadata=meta)
        except grpc.RpcError as e:
            code = e.code()
            return "unauthenticated" if code == grpc.StatusCode.UNAUTHENTICATED else f"other: {code.name}"
    return "ok"


def token_problem(address: str | None, env: Mapping[str, str] | None = None, timeout: float = 5.0) -> str:
    """One line naming what keeps this driver out of the cluster at `address` and how to fix it, or
    "" when nothing does (or it cannot tell)."""
    env = os.environ if env is None else env
    gcs = gcs_address(address)
    if gcs is None:
        return ""
    mode = (env.get(AUTH_MODE_ENV) or "").strip().lower()
    token, where = driver_token(env)
    if mode == "token" and token is None:
        # Ray would raise at once, as a traceback; the same fact, said once
        return (f"Ray token authentication is on for this driver ({AUTH_MODE_ENV}=token) but it has no token: "
                f"{TOKEN_ENV} is not set, {TOKEN_PATH_ENV} names no readable file and {default_token_file(env)} "
                f"does not exist. Give it the cluster's token: {WHERE}")
    sent = token if mode == "token" else None
    answer = probe(gcs, sent, timeout)
    if answer != "unauthenticated":
        return ""
    if sent is None:
        have = (f"; a token is at hand ({where}), only {AUTH_MODE_ENV}=token is missing" if token else "")
        return (f"the Ray cluster at {gcs} requires a token (token authentication is on) and this driver sends "
                f"none: {AUTH_MODE_ENV} is {mode or 'not set'} here{have}. Fix: export {AUTH_MODE_ENV}=token "
                f"and give the driver the cluster's token: {WHERE}")
    return (f"the Ray cluster at {gcs} refused the token this driver sends (from {where}): it is not that "
            f"cluster's token. Fix: give the driver the head's token: {WHERE}")


def check_driver_token(address: str | None, env: Mapping[str, str] | None = None) -> None:
    """Raise RayTokenError (one line) when `token_problem` finds one."""
    msg = token_problem(address, env)
    if msg:
        raise RayTokenError(msg)

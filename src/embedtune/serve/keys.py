"""Where the server's API key comes from, and whether it may listen without one.

A key given as a command-line value is visible to every local user in ``ps`` and lands in shell
history, so it is read from an environment variable or a file only.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path

from embedtune.console import log

CLI_VALUE_REFUSED = (
    "--api-key VALUE is not accepted: a key on the command line is visible to every user in `ps` and "
    "stays in shell history. Put it in an environment variable and pass --api-key-env NAME, or in a "
    "file only you can read (chmod 600) and pass --api-key-file PATH"
)


def read_api_key(env_name: str | None = None, file: str | Path | None = None) -> str | None:
    """The key from the variable ``env_name`` or the first line of ``file``; None when neither is set."""
    if env_name and file:
        raise ValueError("give the API key through --api-key-env or --api-key-file, not both")
    if file:
        return _read_key_file(Path(file).expanduser())
    if env_name:
        key = os.environ.get(env_name, "").strip()
        if not key:
            raise ValueError(f"the API key variable {env_name!r} (serve.api_key_env) is unset or empty")
        return key
    return None


def _read_key_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"API key file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"API key file {path} is unreadable: {type(exc).__name__}") from None
    key = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not key:
        raise ValueError(f"API key file {path} is empty")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("API key file %s is readable by other users; chmod 600 it", path)
    return key


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'; any other name or address (0.0.0.0 included) is not."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to a public interface


def check_exposure(host: str, key: str | None, insecure_no_auth: bool) -> None:
    """Refuse to listen beyond this machine without a key unless the operator said so explicitly."""
    if key or is_loopback(host):
        return
    if not insecure_no_auth:
        raise ValueError(
            f"refusing to serve on {host} without an API key: anyone who can reach it could use it. Pass "
            "--api-key-env NAME or --api-key-file PATH (or serve.api_key_env), or --insecure-no-auth if "
            "the network in front of it does the access control")
    log.warning("serving on %s WITHOUT authentication (--insecure-no-auth)", host)

"""Where the server's API key comes from, and whether it may listen without one.

A key given as a command-line value is visible to every local user in ``ps`` and lands in shell
history, so it is read from an environment variable or a file only. With neither, the server still
requires one: it uses (and on first use creates) a random key in a 0600 file of the user's config dir,
as Jupyter does with its token, so another local user of the machine cannot use a loopback server.
Serving without a key takes ``--insecure-no-auth`` and a loopback host.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
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


def local_key_file() -> Path:
    """``$EMBEDTUNE_SERVE_KEY_FILE``, else ``$XDG_CONFIG_HOME/embedtune/serve.key`` (``~/.config/...``)."""
    if env := os.environ.get("EMBEDTUNE_SERVE_KEY_FILE"):
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "embedtune" / "serve.key"


def ensure_key_file(path: Path) -> tuple[str, bool]:
    """The key in ``path``; a new random one written there (0600, never world-readable) when the file does
    not exist. Returns (key, created)."""
    if path.exists():
        return _read_key_file(path), False
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)
    try:  # O_EXCL: two servers starting at once must not both write (and one of them hand out a dead key)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_key_file(path), False
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(key + "\n")
    return key, True


def check_exposure(host: str, key: str | None, insecure_no_auth: bool) -> None:
    """Auth off only when the operator said so, and never beyond this machine."""
    if key:
        return
    if not is_loopback(host):
        raise ValueError(
            f"refusing to serve on {host} without an API key: anyone who can reach it could use it. Pass "
            "--api-key-env NAME or --api-key-file PATH (or serve.api_key_env), or put a proxy that does the "
            "access control in front of a loopback server")
    if insecure_no_auth:
        log.warning("serving on %s WITHOUT authentication (--insecure-no-auth): every local user can use it", host)

"""Kept so `from embedtune.client import PlatformClient` works; the client is in embedtune.platform.client."""

from embedtune.platform.client import API_KEY_ENV, TERMINAL, PlatformAPIError, PlatformClient

__all__ = ["API_KEY_ENV", "TERMINAL", "PlatformAPIError", "PlatformClient"]

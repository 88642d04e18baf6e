"""The platform's routers, one module each; :mod:`embedtune.platform.app` assembles them."""

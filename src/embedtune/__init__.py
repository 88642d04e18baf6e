"""embedtune: turn domain documents into a retrieval embedding model that knows the domain."""

__version__ = "0.1.0"

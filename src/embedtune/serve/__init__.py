"""OpenAI- and NIM-compatible embedding server with dynamic batching (see :func:`create_app`)."""

from embedtune.serve.app import create_app
from embedtune.serve.backends import Backend, OnnxBackend, TorchBackend, reduce_dimensions
from embedtune.serve.loading import ModelEntry, model_entry
from embedtune.serve.runner import run_server, start_in_thread

__all__ = ["Backend", "ModelEntry", "OnnxBackend", "TorchBackend", "create_app", "model_entry",
           "reduce_dimensions", "run_server", "start_in_thread"]

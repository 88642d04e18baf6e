"""OpenAI- and NIM-compatible embedding server with dynamic batching.

    embedtune serve --model runs/myrun           # its export/ (ONNX; int8 on CPU where faster) when present, else torch
    embedtune serve --model prod=runs/a --model base=default --api-key-env EMBEDTUNE_KEY

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    client.embeddings.create(model="prod", input=["..."], dimensions=256, extra_body={"input_type": "query"})

Layout: :mod:`.tokens` (prompts, truncation, token-id inputs), :mod:`.backends` (torch / ONNX behind one
interface), :mod:`.batching` (token-budget dynamic batcher), :mod:`.guard` (auth, size limit, request
metrics), :mod:`.keys` (where the key comes from), :mod:`.app` (routes), :mod:`.runner` (uvicorn in the
foreground or a thread).
"""

from embedtune.serve.app import create_app
from embedtune.serve.backends import Backend, OnnxBackend, TorchBackend, reduce_dimensions
from embedtune.serve.loading import ModelEntry, model_entry
from embedtune.serve.runner import run_server, start_in_thread

__all__ = ["Backend", "ModelEntry", "OnnxBackend", "TorchBackend", "create_app", "model_entry",
           "reduce_dimensions", "run_server", "start_in_thread"]

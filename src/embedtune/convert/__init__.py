"""The ONNX converter: a library below the stages, used by the export stage and by the sdg and prep filters.

- :mod:`.graph` traces a model's backbone with pooling, normalisation and Matryoshka truncation in the graph;
- :mod:`.formats` is the registry of derived formats (int8, fp16, TensorRT) that :func:`.onnx_export.export_onnx`
  builds from the fp32 graph;
- :mod:`.quantize` holds the int8 rules, :mod:`.parity` the checks of an export against its torch model;
- :mod:`.cached` keeps one checked int8 export per model identity in the embedtune cache (the filters'
  fast base-model encoder).

Running an export folder is :class:`embedtune.retrieval.onnx.OnnxEncoder`'s job (onnxruntime only).
"""

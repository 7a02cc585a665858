"""``mmlm serve``: the HTTP API over index folders that ``mmlm index`` built, laid out as FastAPI lays out a
larger application, one concern per module:

- ``command``: the command line's typed signature (standard library only: ``mmlm --help`` stays fast).
- ``settings``: ``Settings``, everything the command can be told.
- ``app``: ``create_app(settings, served)``, assembly only; ``served``: ``open_indexes``.
- ``routers/``: ``search`` (mmlm's routes), ``clip_retrieval`` (clip-retrieval's), ``service`` (health,
  metrics, page, item images); ``deps``: their dependencies and shared checks; ``schemas``: bodies and answers;
  ``queries``: from a request to the worker and back.
- ``batcher``: the supervised model worker; ``threads``: its torch / FAISS threads; ``explainer``: ``/explain``
  on its own thread.
- ``runtime/``: a model's encoders behind one interface (``base.Runtime``), run by torch (``runtime.torch``) or
  ONNX Runtime (``runtime.onnx``), chosen by ``runtime.load``; only the torch one imports torch.
- ``security``: API key, body limit, content type, log redaction; ``images``: decoding and fetching;
  ``metrics``: Prometheus.

Nothing is imported here, so the command's module loads without torch or FastAPI.
"""

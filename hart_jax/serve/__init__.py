"""Serving: the web demo and the JSON endpoint (``python -m hart_jax.serve``), with request
batching. ``schema`` checks a request, ``batcher`` gathers concurrent ones into compiled batches,
``api`` is the JSON endpoint, ``app`` the Gradio page and the server. See docs/serving.md.
"""

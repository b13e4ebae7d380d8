"""Models: references and offline providers (``refs``), loading and inference, embeddings, the tiny test model,
memory planning. Importing this package is light; torch and transformers load inside the functions that use them."""

from llmops_jupyter.models.refs import PROVIDERS, ModelRef, model_cache_dir, resolve_model, use_model

__all__ = ["PROVIDERS", "ModelRef", "model_cache_dir", "resolve_model", "use_model"]

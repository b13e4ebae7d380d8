"""Export a model version to GGUF (llama.cpp / Ollama) with a deploy-parity gate (``%llmops gguf``, ``parity``)."""

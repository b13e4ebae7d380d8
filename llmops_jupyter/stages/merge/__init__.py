"""``%llmops merge``: fold a LoRA adapter into its full-precision base and verify it."""

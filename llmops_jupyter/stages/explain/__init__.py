"""``%llmops explain``: why a model answered this (token views, contrast, logit lens, attribution)."""

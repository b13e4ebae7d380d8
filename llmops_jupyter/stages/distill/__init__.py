"""``%llmops distill``: logit distillation (forward/reverse KL, JSD; chunked) on the fine-tuning template."""

"""``%llmops quantize``: GPTQ (GPTQModel) or bitsandbytes export with a report."""

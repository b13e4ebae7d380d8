"""``%llmops finetune``: the command (``stage``), SFT and DPO engines (``sft``, ``dpo``), detached workers (``launch``), the live dashboard and training figures."""

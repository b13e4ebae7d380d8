"""Adaptation without new weights and preference data: versioned prompts, RAG indexes, augmentation of eval items and requests, DPO pairs."""

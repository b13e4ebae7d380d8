"""``%llmops data``: load, validate, clean, split and version a dataset (``stage``); the on-disk format every stage reads (``format``)."""

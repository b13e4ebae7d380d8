"""``%llmops prune``: depth, width and wanda pruning on calibration data, with a before/after report."""

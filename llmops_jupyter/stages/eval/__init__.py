"""``%llmops eval`` / ``rate``: the command (``stage``), generation, metrics, judge, gates, the per-example store, plots and the rating widget."""

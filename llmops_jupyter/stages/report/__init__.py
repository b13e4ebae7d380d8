"""``%llmops report``: the command (``stage``) and the self-contained HTML page it writes (``html``)."""

"""Front ends: the ``%llmops`` magics, the ``llmops`` CLI, argument parsing, progress display and the front door
(:func:`llmops_jupyter.frontends.frontdoor.execute`) that every one of them calls."""

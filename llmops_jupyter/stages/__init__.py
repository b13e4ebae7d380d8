"""One package per lifecycle stage: its command module (``stage``), its engine modules and its widgets.

Each stage's command module imports only the standard library and :mod:`llmops_jupyter.core` at top level: the
catalog (:data:`llmops_jupyter.core.stage.CATALOG`) imports all of them to build ``%llmops?`` help.
"""

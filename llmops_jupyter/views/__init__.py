"""Read-only views over the registry: ``runs``, ``show``, ``lineage``, ``models``/``plan``. Not recorded as runs."""

"""The core every other layer builds on: config base, error tree, run context and events, the command catalog and
the Runner. Nothing here imports from above (registry excepted, which imports only ``core.files``/``core.errors``);
a test fails on any import cycle in the package."""

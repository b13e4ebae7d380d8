"""Notebook views. Each subscribes to runner events; none is imported by `%load_ext`."""

"""Monitoring of logged traffic: per-record checks, drift, alert rules, OpenTelemetry export.

Light at import (stdlib only); numpy, sentence-transformers and the model are imported where they are used.
"""

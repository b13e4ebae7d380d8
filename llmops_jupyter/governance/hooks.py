"""Imported by the front door: registers the audit-log and resource-sampling Runner global listeners."""

from __future__ import annotations

from . import audit, gpu

audit.install()
gpu.install()

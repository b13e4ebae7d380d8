"""Eval suites that are not a dataset of prompts and references (bias: CrowS-Pairs, StereoSet)."""

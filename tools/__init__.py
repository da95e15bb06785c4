"""Operator tools for the vote aggregation service (run as `python -m tools.NAME`)."""

"""Helpers of ``scripts/bench``, the load generator for Matrix media repositories."""

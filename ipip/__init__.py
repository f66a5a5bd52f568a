"""Pipit ipip."""

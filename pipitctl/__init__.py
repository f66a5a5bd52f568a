"""Pipit pipitctl."""

"""Pipit ipam."""

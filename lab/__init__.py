"""Pipit lab."""

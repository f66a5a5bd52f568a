"""Pipit route_reflector."""

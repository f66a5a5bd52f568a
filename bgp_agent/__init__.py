"""Pipit bgp_agent."""

"""Handlers: a validated request -> engine request -> answer in the protocol's shape."""

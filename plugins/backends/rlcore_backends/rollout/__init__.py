"""Rollout engines: the `Engine` protocol and tool driver every engine shares, and one package per engine."""

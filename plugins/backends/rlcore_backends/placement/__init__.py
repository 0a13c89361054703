"""Placements: where the backend and rollout plugins run (`--set plugins.placement=NAME`)."""

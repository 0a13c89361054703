"""`ray` placement: backend and rollout as Ray actors, colocated or disaggregated."""

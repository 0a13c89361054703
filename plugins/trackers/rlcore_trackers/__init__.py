"""rlcore experiment trackers: each records a run's resolved config, every metric and the generation tables
to one library's own store, and resumes into the same run after `rlcore run --resume`."""

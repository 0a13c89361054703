"""Update backends: one package per trainer (`--backend NAME`)."""

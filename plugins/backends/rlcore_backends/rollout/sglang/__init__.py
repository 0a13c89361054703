"""`--rollout sglang`: the SGLang offline engine or its HTTP server."""

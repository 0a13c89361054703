"""rlcore algorithm plugins (entry point group `rlcore.algo`): grpo, drgrpo, gmpo, dapo, gspo, rloo, reinforce_pp.

Each algorithm is a class with typed `Options` and `advantage` / `policy_loss` hooks over pure tensor
modules: `advantages` (estimators), `losses` (policy losses), `aggregation` (loss modes with global
counts), `kl` (estimators and the adaptive coefficient) and `shaping` (DAPO's overlong penalty and filter).
"""

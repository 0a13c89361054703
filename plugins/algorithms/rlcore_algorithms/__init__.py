"""rlcore algorithm plugins (entry point group `rlcore.algo`): grpo, drgrpo, gmpo, dapo, gspo, rloo, reinforce_pp.

Each algorithm is a short recipe over the core's public toolkit (`rlcore.toolkit`: estimators, losses,
aggregation, KL, shaping and the `Algorithm` frame), written exactly as a third-party algorithm is.
"""

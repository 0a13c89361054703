"""Helpers for testing rlcore plugins in isolation: input builders and per-kind contract checks.

Third-party plugins run the same checks against themselves, e.g.::

    from rlcore.testing import check_task
    def test_contract(): check_task(MyTask(MyTask.Options()))
"""

from rlcore.testing.builders import make_batch, make_prompts, tiny_model_dir
from rlcore.testing.contracts import (check_algorithm, check_backend, check_hardware, check_rollout, check_task,
                                      make_context)

__all__ = ["check_algorithm", "check_backend", "check_hardware", "check_rollout", "check_task", "make_batch",
           "make_context", "make_prompts", "tiny_model_dir"]

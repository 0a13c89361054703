"""Helpers for testing rlcore plugins in isolation: input builders and per-kind contract checks.

Third-party plugins run the same checks against themselves, e.g.::

    from rlcore.testing import check_task
    def test_contract(): check_task(MyTask(MyTask.Options()))
"""

from rlcore.testing.builders import make_batch, make_prompts, tiny_model_dir

__all__ = ["make_batch", "make_prompts", "tiny_model_dir"]

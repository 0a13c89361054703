"""The tracker tests run the real `rlcore` command with the integration tests' helper."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))

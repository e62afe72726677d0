"""The observe tests use real tools; observe_tools.py finds them and fails, naming the fix, when one is missing."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

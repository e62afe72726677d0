"""The chart tests render charts/trainyard with helm; chart_rendering.py holds the shared parts."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

"""Write the dashboards and alert rules into the chart, or check the checked-in ones.

python -m trainyard.observe            # (re)write them
python -m trainyard.observe --check    # exit 1 naming every stale file
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainyard.observe import alerts, dashboards

CHART = Path(__file__).resolve().parents[3] / "charts" / "trainyard"
DASHBOARDS_DIR = "dashboards"
RULES_FILE = "rules/trainyard.rules.yaml"


def generated_files() -> dict[str, str]:
    """Path inside the chart → content."""
    files = {f"{DASHBOARDS_DIR}/{name}": text for name, text in dashboards.render_all().items()}
    files[RULES_FILE] = alerts.render()
    return files


def stale_files(chart: Path = CHART) -> list[str]:
    """Generated files that differ from the chart's, and dashboards the generator no longer makes."""
    expected = generated_files()
    stale = [
        path
        for path, text in expected.items()
        if not (chart / path).is_file() or (chart / path).read_text() != text
    ]
    for extra in sorted((chart / DASHBOARDS_DIR).glob("*.json")):
        if f"{DASHBOARDS_DIR}/{extra.name}" not in expected:
            stale.append(f"{DASHBOARDS_DIR}/{extra.name}")
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainyard.observe", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when stale")
    parser.add_argument("--chart", type=Path, default=CHART, help="the chart directory")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.chart)
        for path in stale:
            print(
                f"stale: {args.chart / path} (run `python -m trainyard.observe`)", file=sys.stderr
            )
        return 1 if stale else 0
    for extra in (args.chart / DASHBOARDS_DIR).glob("*.json"):
        extra.unlink()
    for path, text in generated_files().items():
        target = args.chart / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

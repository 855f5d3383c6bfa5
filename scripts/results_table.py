"""Print a Markdown results row per report folder (metrics.json of `masa-rt eval`).

    python scripts/results_table.py reports/hands_masa_causal reports/hands_raw ...
"""

import json
import sys
from pathlib import Path

COLUMNS = [
    ("cls 10%", ("phase_classification", "10%")),
    ("cls 50%", ("phase_classification", "50%")),
    ("cls 100%", ("phase_classification", "100%")),
    ("progress R2", ("phase_progress", "r2")),
    ("tau", ("kendalls_tau", "tau")),
    ("reversed tau", ("reversed_clip_tau", "tau")),
    ("crop err", ("crop_error", "error")),
    ("AP@5", ("frame_retrieval", "ap@5")),
    ("AR %", ("action_recognition", "accuracy")),
    ("NMI", ("activity_separation", "nmi")),
]


def cell(metrics: dict, path: tuple[str, str]) -> str:
    value = metrics.get(path[0], {})
    value = value.get(path[1]) if isinstance(value, dict) else None
    if value is None:
        return "–"
    return f"{value:.2f}" if abs(value) > 1.5 else f"{value:.3f}"


def main() -> None:
    print("| embedding | " + " | ".join(c for c, _ in COLUMNS) + " |")
    print("| --- |" + " ---: |" * len(COLUMNS))
    for folder in sys.argv[1:]:
        m = json.loads((Path(folder) / "metrics.json").read_text())
        print(f"| {Path(folder).name} | "
              + " | ".join(cell(m["metrics"], p) for _, p in COLUMNS) + " |")


if __name__ == "__main__":
    main()

"""Collect the 1-step (and 2/4-step) FIDs of every report in this folder into summary.md.

    python benchmarks/tools/summarize_ema_length.py
"""
import json
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "add_dmd" / "ema_length"


def main() -> None:
    rows = ["| report | pipeline | steps | FID | IS | accuracy |", "|---|---|---:|---:|---:|---:|"]
    for report in sorted(HERE.glob("*/report.json")):
        data = json.loads(report.read_text())
        for line in data["lines"]:
            for r in line["results"]:
                acc = r.get("prompt_accuracy")
                rows.append(f"| `{report.parent.name}/` | {line['label']} | {r['steps']} | {r['fid']:.3f} | "
                            f"{r['isc_mean']:.3f} | {'' if acc is None else f'{100 * acc:.1f}%'} |")
    (HERE / "summary.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

"""`loramix check` rendered: each adapter's verdicts (`loramix.compat.Report`) as text or JSON."""

from __future__ import annotations

import json

from loramix.compat import Report


def check_text(reports: list[Report]) -> str:
    """A block per adapter: one line per consumer (status, what to pass it or why not), then the fix."""
    blocks = []
    for report in reports:
        width = max(len(v.consumer) for v in report.verdicts)
        lines = [report.name]
        for v in report.verdicts:
            detail = "; ".join(part for part in (v.reason, v.note) if part)
            lines.append(f"  {v.consumer:<{width}}  {v.status:<5}  {detail}".rstrip())
            if v.fix and v.status != "yes":
                lines.append(f"  {'':<{width}}         fix: {v.fix}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def check_json(reports: list[Report]) -> str:
    return json.dumps([r.to_dict() for r in reports], indent=2)

"""`loramix inspect` rendered: one adapter's facts as JSON-ready data, and as a readable text block."""

from __future__ import annotations

import json
from collections import Counter

from loramix import experts
from loramix.adapter import LoraAdapter, dtype_name, unpadded_rank
from loramix.analysis.names import type_counts, type_summary


def adapter_summary(adapter: LoraAdapter) -> dict:
    """What `loramix inspect` reports about one adapter, as JSON-ready data."""
    modules = adapter.modules.values()
    scales = sorted({round(m.scale, 6) for m in modules})
    features = [
        name
        for name, present in (
            ("rslora", adapter.use_rslora),
            ("dora", adapter.has_dora),
            ("lora_bias", adapter.has_lora_bias),
            ("embedding", any(m.layout == "embedding" for m in modules)),
            ("conv2d", any(m.layout == "conv2d" for m in modules)),
            ("conv1d_fan_in_fan_out", any(m.layout == "conv1d_fan_in_fan_out" for m in modules)),
        )
        if present
    ]
    nonfinite = adapter.nonfinite()
    return {
        "name": adapter.name,
        "source": adapter.source,
        "file": adapter.provenance.get("file"),
        "base_model": adapter.base_model,
        "architecture": adapter.provenance.get("architecture"),
        "trained_on": adapter.provenance.get("sd_model_name"),  # the checkpoint file kohya's metadata names
        "task_type": adapter.task_type,
        "dtype": dtype_name(adapter.dtype),
        "num_modules": len(adapter.modules),
        "module_types": type_counts(adapter.modules),
        "ranks": adapter.ranks,
        "unpadded_ranks": sorted({unpadded_rank(m) for m in modules}),  # without portable_layout's zero padding
        "scales": scales,
        "num_params": adapter.num_params(),
        "file_bytes": adapter.file_bytes,
        "features": features,
        "extra_tensors": sorted(adapter.extra),
        "extra_shapes": {n: list(e.tensor.shape) for n, e in sorted(adapter.extra.items())},
        "nonfinite_values": sum(nonfinite.values()),
        "nonfinite_tensors": nonfinite,
        "warnings": list(adapter.warnings),
        "lycoris": list(adapter.provenance.get("lycoris") or []),
        "experts": _experts(adapter),
    }


def _experts(adapter: LoraAdapter) -> dict | None:
    """The fused expert parameters (PEFT target_parameters): how many, their expert counts, the ranks per expert."""
    found = experts.groups(adapter.modules)
    if not found:
        return None
    return {
        "parameters": len(found),
        "kinds": dict(sorted(Counter(p.rsplit(".", 1)[-1] for p in found).items())),
        "experts": sorted({m.expert.count for ms in found.values() for m in ms.values()}),
        "ranks_per_expert": sorted({m.rank for ms in found.values() for m in ms.values()}),
    }


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _source(summary: dict) -> str:
    """The source, and the file read when the source is a folder holding one (kohya, state dict)."""
    file = summary["file"]
    return summary["source"] if not file or summary["source"].endswith(file) else f"{summary['source']} ({file})"


def _ranks(summary: dict) -> str:
    stored, used = (", ".join(map(str, summary[key])) for key in ("ranks", "unpadded_ranks"))
    if stored == used:
        return stored
    return f"{used}, stored as {stored} (zero-padded for engines that need one rank; --rank-layout exact for {used})"


def inspect_text(summaries: list[dict]) -> str:
    """A readable block per adapter."""
    blocks = []
    for s in summaries:
        types = type_summary(s["module_types"])
        rows = [
            ("source", _source(s)),
            (
                "base model",
                (s["base_model"] or "(unknown)") + (f" (trained on {s['trained_on']})" if s.get("trained_on") else ""),
            ),
            *([("architecture", s["architecture"])] if s.get("architecture") else []),
            ("task", s["task_type"] or "-"),
            ("dtype", s["dtype"]),
            ("modules", f"{s['num_modules']} ({types})"),
            ("ranks", _ranks(s)),
            ("scale", ", ".join(f"{v:g}" for v in s["scales"])),
            ("parameters", f"{s['num_params']:,}"),
            ("file size", _size(s["file_bytes"]) if s["file_bytes"] else "-"),
            ("features", ", ".join(s["features"]) or "-"),
            ("extra tensors", ", ".join(f"{n} {s['extra_shapes'][n]}" for n in s["extra_tensors"]) or "-"),
        ]
        rows += [("LyCORIS", kind) for kind in s.get("lycoris", [])]
        if s.get("experts"):
            rows.append(("experts", _experts_text(s["experts"])))
        lines = [s["name"]] + [f"  {k:<14}{v}" for k, v in rows]
        lines += [f"  {'warning':<14}{w}" for w in s["warnings"]]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _experts_text(found: dict) -> str:
    kinds = ", ".join(f"{k} ×{n}" for k, n in found["kinds"].items())
    counts = "/".join(map(str, found["experts"]))
    ranks = ", ".join(map(str, found["ranks_per_expert"]))
    return f"{found['parameters']} fused parameters ({kinds}): {counts} experts each, rank {ranks} per expert"


def inspect_json(summaries: list[dict]) -> str:
    return json.dumps(summaries, indent=2)

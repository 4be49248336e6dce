"""`loramix analyze` on mixture-of-experts adapters: which experts each adapter changes most, and how much two
adapters' updates of the same expert agree (each expert taken over all its parameters: gate_up and down)."""

from __future__ import annotations

import math
import re
from collections import defaultdict

_EXPERT = re.compile(r"^(?P<owner>.*\.experts)\.(?P<index>\d+)\.[^.]+$")


def expert_of(name: str) -> str | None:
    """``…mlp.experts.3`` for an expert's module (``…mlp.experts.3.gate_up_proj``), else None."""
    found = _EXPERT.match(name)
    return f"{found['owner']}.{found['index']}" if found else None


def _energies(modules: dict) -> dict[str, float]:
    energy: dict[str, float] = defaultdict(float)
    for name, m in modules.items():
        expert = expert_of(name)
        if expert is not None:
            energy[expert] += m.norm**2
    return energy


def expert_lines(analysis, *, top: int = 5) -> list[str]:
    """The experts section of the terminal summary (empty when no adapter has expert modules)."""
    lines = []
    energies = {a.name: _energies(a.modules) for a in analysis.adapters}
    for a in analysis.adapters:
        energy = energies[a.name]
        total = sum(energy.values())
        if total <= 0:
            continue
        ranked = sorted(energy.items(), key=lambda item: item[1], reverse=True)[:top]
        lines += ["", f"Experts {a.name} changes most ({len(energy)} experts; share of its experts' ‖ΔW‖²)"]
        lines += [f"  {expert:<40} {100 * value / total:5.1f}%" for expert, value in ranked]
    for pair in analysis.pairs:
        inner: dict[str, float] = defaultdict(float)
        for name, overlap in pair.modules.items():
            expert = expert_of(name)
            if expert is not None:
                inner[expert] += overlap.inner
        one, other = energies[pair.a], energies[pair.b]
        cosines = {e: value / math.sqrt(one[e] * other[e]) for e, value in inner.items() if one.get(e) and other.get(e)}
        if cosines:
            ranked = sorted(cosines.items(), key=lambda item: item[1])
            shown = ranked if len(ranked) <= 2 * top else ranked[:top] + ranked[-top:]
            lines += ["", f"{pair.a} ~ {pair.b}: cosine of each shared expert's update (least and most alike)"]
            lines += [f"  {expert:<40} {value:+.3f}" for expert, value in shown]
    return lines

"""`loramix methods` and `loramix examples`: what the package holds, listed (torch-free)."""

from __future__ import annotations

import click

from loramix.cli.options import (
    errors_as_one_line,
)


@click.command()
def methods() -> None:
    """List the merge methods."""
    from loramix.methods import REGISTRY

    width = max(len(n) for n in REGISTRY)
    for m in REGISTRY.values():
        tags = [t for t, on in (("exact", m.exact), ("equal ranks", m.equal_ranks), ("needs data", m.data)) if on]
        tags += [{"dense": "dense ΔW", "core": "core space"}[m.space]] if m.space else []
        click.echo(f"{m.name:<{width}}  {m.description}" + (f" [{', '.join(tags)}]" if tags else ""))
        options = ", ".join(f"{k}={v}" for k, v in m.defaults.items())
        details = "; ".join(p for p in (m.paper, f"options (defaults): {options}" if options else "") if p)
        if details:
            click.echo(f"{'':<{width}}    {details}")


@click.command()
@click.argument("name", required=False)
@errors_as_one_line
def examples(name: str | None) -> None:
    """List the bundled examples, or print the folder of example NAME.

    tiny-llama: a tiny random Llama with a character tokenizer; summarize, translate, formal: PEFT adapters made on
    it; dora: a PEFT DoRA adapter on it, for `loramix convert`; few-shot: formal.jsonl, examples for `loramix
    search`; minimind: a hand-made LoRA state dict (.pth) and the module_map.yaml that renames its modules to
    tiny-llama's; tiny-llama-tuned: a "fully fine-tuned" tiny-llama for `loramix extract`.
    """
    from loramix import examples as bundled

    if name:
        click.echo(bundled.path(name))
        return
    for item in bundled.names():
        click.echo(f"{item:<12}{bundled.path(item)}")

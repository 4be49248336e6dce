"""`loramix push`: an output folder loramix wrote, uploaded to a Hub repository."""

from __future__ import annotations

import click

from loramix.cli.options import (
    errors_as_one_line,
)


@click.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository private (when it does not exist yet).")
@click.option("--revision", help="Branch to upload to (created when missing) [default: main].")
@click.option("--commit-message", help="The commit message [default: Upload FOLDER with loramix VERSION].")
@errors_as_one_line
def push(folder: str, repo_id: str, private: bool, revision: str | None, commit_message: str | None) -> None:
    """Upload FOLDER (an adapter or merged checkpoint loramix wrote) to the Hub repository REPO_ID.

    The repository is created if needed. The token is huggingface_hub's: HF_TOKEN or `hf auth login`.
    """
    from loramix.hub import push_to_hub

    url = push_to_hub(folder, repo_id, private=private, revision=revision, commit_message=commit_message)
    click.echo(f"pushed {folder} to {repo_id}: {url}")

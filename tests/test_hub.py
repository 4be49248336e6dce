"""Model cards and `loramix push` / `--push-to-hub`, with the real huggingface_hub client against a fake Hub.

The fake Hub is an http.server on 127.0.0.1 implementing only what create_repo, create_branch and upload_folder use
in huggingface_hub 2.x: POST /api/repos/create, /api/models/{repo}/branch/{rev}, /api/models/{repo}/preupload/{rev}
(every file answered "regular", so contents travel inline, base64, in the commit), /api/validate-yaml and
/api/models/{repo}/commit/{rev} (NDJSON). What arrives is compared byte for byte with the local folder.
"""

from __future__ import annotations

import base64
import contextlib
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard, constants

from loramix import combine, save_adapter
from loramix.cli import main
from loramix.errors import HubError
from loramix.examples import path as example
from loramix.hub import push_to_hub, revisions
from loramix.render.card import model_card

TOKEN = "hf_loramixTestToken0123456789"


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.branches: set[tuple[str, str]] = set()
        self.files: dict[tuple[str, str], dict[str, bytes]] = {}
        self.commits: list[dict] = []
        self.requests: list[tuple[str, str, str | None]] = []
        self.unknown: list[str] = []
        self.url = ""


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 10

        def log_message(self, *args) -> None:  # keep pytest's output clean
            pass

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            # The client's own side request (its agent-harness registry, for the user agent) is answered "none".
            # repo_info (create_repo asks it after a 403, to see whether the repository exists anyway) is "not found".
            path = self.path.split("?")[0]
            if path != "/api/agent-harnesses" and not (path.startswith("/api/models/") and path.count("/") == 4):
                hub.unknown.append(f"GET {self.path}")
            self._reply(404, {"error": "Repository not found"})

        def requests_seen(self, body: bytes | None) -> None:
            hub.requests.append((self.command, self.path, self.headers.get("Authorization")))

        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.requests_seen(body)
            path = self.path.split("?")[0]
            parts = path.strip("/").split("/")
            if path == "/api/repos/create":
                payload = json.loads(body)
                repo_id = f"{payload['organization']}/{payload['name']}"
                if payload["name"] == "forbidden":
                    return self._reply(
                        403, {"error": "You don't have the rights to create a model under this namespace"}
                    )
                if repo_id in hub.repos:
                    return self._reply(
                        409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"}
                    )
                hub.repos[repo_id] = payload
                return self._reply(200, {"url": f"{hub.url}/{repo_id}"})
            if path == "/api/validate-yaml":
                return self._reply(200, {"errors": [], "warnings": []})
            if len(parts) == 6 and parts[:2] == ["api", "models"]:
                repo_id, action, revision = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
                if repo_id not in hub.repos:
                    return self._reply(404, {"error": "Repository not found"})
                if action == "branch":
                    hub.branches.add((repo_id, revision))
                    return self._reply(200, {})
                if action == "preupload":
                    files = json.loads(body)["files"]
                    modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                    return self._reply(200, {"files": modes})
                if action == "commit":
                    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                    stored = hub.files.setdefault((repo_id, revision), {})
                    for item in lines[1:]:
                        assert item["key"] == "file" and item["value"]["encoding"] == "base64", item["key"]
                        stored[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    hub.commits.append({"repo": repo_id, "revision": revision, **lines[0]["value"]})
                    oid = f"{len(hub.commits):040x}"
                    return self._reply(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid})
            hub.unknown.append(f"POST {self.path}")
            return self._reply(404, {"error": "not in the fake Hub"})

    return Handler


@contextlib.contextmanager
def running_fake_hub():
    """A `FakeHub` served on 127.0.0.1 by a thread of this process (``hub.url``), stopped on exit."""
    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A fake Hub on loopback; huggingface_hub pointed at it (its constants are read at import, so patched)."""
    with running_fake_hub() as hub:
        yield from _pointed_at(hub, monkeypatch, tmp_path)


def _pointed_at(hub, monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets it for every other test
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login-cache" / "token"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"), raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    yield hub
    assert not hub.unknown, f"routes the fake Hub does not serve: {hub.unknown}"


def _local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _combine_cli(tmp_path, monkeypatch, *extra: str) -> tuple[list[str], object]:
    args = ["combine", str(example("summarize")), str(example("translate")), "-w", "0.6,0.4", "-m", "svd"]
    args += ["--rank", "4", *extra]
    monkeypatch.setattr(sys, "argv", ["loramix", *args])  # what the card records as the command line
    return args, CliRunner().invoke(main, args)


def test_api_push_uploads_the_folder_byte_for_byte(tmp_path, fake_hub):
    merged = combine([example("summarize"), example("formal")], weights=[0.5, 0.5], method="cat")
    folder = save_adapter(merged, tmp_path / "out")
    url = push_to_hub(folder, "me/cat-merge", endpoint=fake_hub.url)
    assert url.startswith(f"{fake_hub.url}/me/cat-merge/commit/")
    assert fake_hub.files[("me/cat-merge", "main")] == _local_files(folder)
    assert set(_local_files(folder)) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    assert {auth for _, _, auth in fake_hub.requests} == {f"Bearer {TOKEN}"}
    assert fake_hub.repos["me/cat-merge"]["name"] == "cat-merge"
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "loramix-examples/tiny-llama"
    assert card.data.base_model_relation == "adapter" and card.data.library_name == "peft"
    assert {"loramix", "cat"} <= set(card.data.tags)
    assert "Python API" in card.text and "arxiv" not in card.text.lower()
    # pushing again: the repository exists (409 is fine), the new commit lands
    push_to_hub(folder, "me/cat-merge", endpoint=fake_hub.url, commit_message="again")
    assert fake_hub.commits[-1]["summary"] == "again"


def test_combine_push_to_hub_writes_card_and_recipe_and_uploads_them(tmp_path, fake_hub, monkeypatch):
    out = tmp_path / "merged"
    args, result = _combine_cli(tmp_path, monkeypatch, "-o", str(out), "--push-to-hub", "me/svd-merge")
    assert result.exit_code == 0, result.output
    assert "pushed" in result.output and TOKEN not in result.output
    assert set(_local_files(out)) == {"README.md", "adapter_config.json", "adapter_model.safetensors", RECIPE}
    assert fake_hub.files[("me/svd-merge", "main")] == _local_files(out)
    pushed = tmp_path / "pushed-README.md"
    pushed.write_bytes(fake_hub.files[("me/svd-merge", "main")]["README.md"])
    card = ModelCard.load(pushed)
    assert card.data.to_dict()["base_model_relation"] == "adapter"
    assert {"loramix", "svd"} <= set(card.data.tags)
    assert "loramix combine " + " ".join(args[1:3]) in card.text  # the real argv, shlex-joined
    assert "| `" + str(example("summarize")) + "` | 0.6 | local |" in card.text
    # the card describes the file: rank 4 written at 8, the portable layout (by design), said once ("rank 8")
    assert "rank 8," in card.text and "rank 8–8" not in card.text
    assert "cosine" in card.text and "Eckart" in card.text
    # the recipe beside it repeats the run
    again = CliRunner().invoke(main, ["combine", "--recipe", str(out / RECIPE), "-o", str(tmp_path / "again")])
    assert again.exit_code == 0, again.output
    assert (tmp_path / "again" / "adapter_model.safetensors").read_bytes() == (
        out / "adapter_model.safetensors"
    ).read_bytes()


RECIPE = "loramix_recipe.yaml"


def test_merged_checkpoint_card_and_push_with_options(tmp_path, fake_hub, monkeypatch):
    out = tmp_path / "model"
    _, result = _combine_cli(tmp_path, monkeypatch, "--merge-into", str(example("tiny-llama")), "-o", str(out))
    assert result.exit_code == 0, result.output
    card = ModelCard.load(out / "README.md")
    assert card.data.to_dict()["base_model_relation"] == "merge"
    assert card.data.library_name == "transformers" and "loramix" in card.data.tags
    push = ["push", str(out), "me/merged-model", "--private", "--revision", "dev", "--commit-message", "merged"]
    result = CliRunner().invoke(main, push)
    assert result.exit_code == 0, result.output
    assert TOKEN not in result.output
    created = fake_hub.repos["me/merged-model"]
    assert created.get("visibility", "private" if created.get("private") else None) == "private"  # hub 2.x / 1.x
    assert ("me/merged-model", "dev") in fake_hub.branches
    assert fake_hub.files[("me/merged-model", "dev")] == _local_files(out)
    assert fake_hub.commits[-1]["summary"] == "merged"


def test_push_without_a_token_says_how_to_log_in(tmp_path, fake_hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    folder = save_adapter(combine([example("formal")], method="cat"), tmp_path / "out")
    result = CliRunner().invoke(main, ["push", str(folder), "me/x"])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "hf auth login" in result.output and "HF_TOKEN" in result.output
    assert not fake_hub.requests


def test_hub_refusal_is_one_line_without_the_token(tmp_path, fake_hub):
    folder = save_adapter(combine([example("formal")], method="cat"), tmp_path / "out")
    with pytest.raises(HubError) as info:
        push_to_hub(folder, "me/forbidden")
    message = str(info.value)
    assert "\n" not in message and TOKEN not in message and "me/forbidden" in message and "403" in message


def test_card_names_the_commit_a_hub_source_resolved_to(hub_cache, tmp_path):
    from helpers import COMMIT, publish, raw_lora_folder

    publish(hub_cache, "org/style", raw_lora_folder(tmp_path / "made"))
    merged = combine(["org/style", str(raw_lora_folder(tmp_path / "other", seed=3))], weights=[0.25, 0.75])
    text = model_card(merged, revisions=revisions(merged.provenance["sources"]))
    assert f"| `org/style` | 0.25 | main (commit {COMMIT}) |" in text
    assert "| 0.75 | local |" in text and "Python API" in text

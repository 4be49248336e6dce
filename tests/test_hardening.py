"""Bad inputs, faults and attacks (issue 16): every expected failure is one line on stderr with exit status 2, no
traceback, no partial output, no input modified, no token printed; outputs are complete, finite and never replace
what loramix did not write; a run killed at any moment leaves the old output, the new one, or the old one set aside
where the next run restores it.

The CLI runs in-process through click's CliRunner (fast); concurrency and SIGKILL run real processes, forked from one
driver process that has imported loramix once (the children run the CLI; the driver only kills and looks).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import publish, raw_lora_folder, write_folder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from loramix import combine, load_adapter, save_adapter
from loramix.cli import main
from loramix.errors import AdapterFormatError, CheckpointError, HubError, OutputError, SourceError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "loramix" / "examples"
TOKEN = "hf_hardeningSECRETtoken0123456789"
Q, V = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"


def digest(path: Path) -> dict[str, str]:
    """Every file under ``path`` (hidden ones too) → its sha256; {} when absent."""
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    if not path.exists():
        return {}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in path.rglob("*") if p.is_file()
    }


def cli(*args: str, env: dict | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], env={"HF_TOKEN": TOKEN, **(env or {})})


def one_line_error(result, match: str | None = None) -> str:
    """Assert ``result`` is an expected failure: exit 2, no traceback, exactly one stderr line, no token."""
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output and TOKEN not in result.output
    lines = result.stderr.splitlines()
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    if match:
        assert match in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------------------------- inputs


def _peft(folder: Path, *, config: dict | None = None, tensors: dict | None = None, dtype=torch.float32) -> Path:
    folder = raw_lora_folder(folder, config=config)
    if tensors is not None or dtype != torch.float32:
        base = json.loads((folder / "adapter_config.json").read_text())
        old = {} if tensors is None else tensors
        if tensors is None:
            from safetensors.torch import load_file

            old = {k: v.to(dtype) for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}
        write_folder(folder, base, old)
    return folder


def _factors(fill: float | None = None, dtype=torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    out = {}
    for name, (o, r, i) in {Q: (8, 4, 6), V: (4, 4, 6)}.items():
        A, B = torch.randn(r, i, generator=gen), torch.randn(o, r, generator=gen)
        if fill is not None:
            A, B = torch.full((r, i), fill), torch.full((o, r), fill)
        out[f"base_model.model.{name}.lora_A.weight"] = A.to(dtype)
        out[f"base_model.model.{name}.lora_B.weight"] = B.to(dtype)
    return out


def _kohya(path: Path, *, down=None, up=None, alpha=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "lora_unet_x_proj.lora_down.weight": torch.randn(4, 6) if down is None else down,
        "lora_unet_x_proj.lora_up.weight": torch.randn(8, 4) if up is None else up,
    }
    if alpha is not None:
        tensors["lora_unet_x_proj.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


def _base_copy(tmp: Path, index: object | None = None, config_text: str | None = None) -> Path:
    base = tmp / "base"
    base.mkdir(parents=True)
    for f in (EXAMPLES / "tiny-llama").iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    if index is not None:
        (base / "model.safetensors.index.json").write_text(json.dumps(index))
    if config_text is not None:
        (base / "config.json").write_text(config_text)
    return base


def _raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path]:
    return raw_lora_folder(tmp_path / "S"), raw_lora_folder(tmp_path / "T", seed=1)


# Each case: a function (tmp, S, T) → the CLI arguments, and a fragment the error line must hold.
def _index_case(index):
    return lambda t, s, _: ["combine", s, "-o", t / "out", "--merge-into", _base_copy(t, index=index)]


TINY_INDEX = json.loads((EXAMPLES / "tiny-llama" / "model.safetensors.index.json").read_text())
CASES = {
    # non-finite weights and values (tracebacks in SVD on main)
    "weights nan,1": (lambda t, s, u: ["combine", s, u, "-m", "cat", "-w", "nan,1", "-o", t / "out"], "weight"),
    "weights nan,nan svd": (lambda t, s, u: ["combine", s, u, "-w", "nan,nan", "-o", t / "out"], "weight"),
    "weights inf,1": (lambda t, s, u: ["combine", s, u, "-w", "inf,1", "-o", t / "out"], "weight"),
    "recipe weight .nan": (
        lambda t, s, u: ["combine", "--recipe", _recipe(t, s, u, "[.nan, 1]")],
        "",
    ),
    "recipe weight .inf": (lambda t, s, u: ["combine", "--recipe", _recipe(t, s, u, "[.inf, 1]")], ""),
    "allow-nonfinite NaN svd": (
        lambda t, s, u: (
            ["combine", _peft(t / "N", tensors=_factors(float("nan"))), u, "--allow-nonfinite"] + ["-o", t / "out"]
        ),
        "NaN/Inf",
    ),
    "lora_alpha 1e308": (
        lambda t, s, u: ["combine", _peft(t / "B", config={"lora_alpha": 1e308}), u, "-o", t / "out"],
        "",
    ),
    # option values
    "option yaml unclosed": (
        lambda t, s, u: ["combine", s, u, "-m", "ties", "--option", "density=[unclosed", "-o", t / "out"],
        "density",
    ),
    "device meta": (lambda t, s, u: ["combine", s, u, "--device", "meta", "-o", t / "out"], "meta"),
    "recipe rank true": (lambda t, s, u: ["combine", "--recipe", _recipe(t, s, u, "[1, 1]", "rank: true")], "rank"),
    # output paths
    "output name too long": (lambda t, s, u: ["combine", s, u, "-o", t / ("x" * 300)], "cannot be written"),
    "output under /proc": (lambda t, s, u: ["combine", s, u, "-o", "/proc/loramix-out"], "/proc"),
    "output under a file": (lambda t, s, u: ["combine", s, u, "-o", _file(t) / "out"], "cannot be written"),
    "output inside an input": (lambda t, s, u: ["combine", s, u, "-o", s / "sub"], "inside the input"),
    "output a symlink": (lambda t, s, u: ["combine", s, u, "-o", _link(t, t / "real")], "symbolic link"),
    "output a dangling symlink": (lambda t, s, u: ["combine", s, u, "-o", _link(t, t / "nowhere")], "symbolic link"),
    "force onto a folder with config.json": (
        lambda t, s, u: ["combine", s, "-o", _unrelated(t), "--force"],
        "not written by loramix",
    ),
    "force onto a third-party adapter": (
        lambda t, s, u: ["combine", s, u, "-o", raw_lora_folder(t / "theirs", seed=5), "--force"],
        "not written by loramix",
    ),
    "analyze --json onto an input": (
        lambda t, s, u: ["analyze", s, u, "--json-file", s / "adapter_config.json", "--force"],
        "the input",
    ),
    # configs and keys
    "config nested 200000 deep": (lambda t, s, u: ["inspect", _deep(t)], "nested too deeply"),
    "r 0": (lambda t, s, u: ["inspect", _peft(t / "A", config={"r": 0})], "r must be"),
    "r negative": (lambda t, s, u: ["inspect", _peft(t / "A", config={"r": -4})], "r must be"),
    "r true": (lambda t, s, u: ["inspect", _peft(t / "A", config={"r": True})], "r must be"),
    "lora_alpha negative": (lambda t, s, u: ["inspect", _peft(t / "A", config={"lora_alpha": -8})], "lora_alpha"),
    "lora_A (8, 0)": (
        lambda t, s, u: ["combine", _peft(t / "A", tensors=_zero_width()), u, "-o", t / "out"],
        "empty",
    ),
    "LoRA key without a module": (
        lambda t, s, u: [
            "inspect",
            _peft(t / "A", tensors={**_factors(), "base_model.model.lora_A.weight": torch.ones(4, 6)}),
        ],
        "names no module",
    ),
    "newline in a tensor name": (
        lambda t, s, u: ["inspect", _peft(t / "A", tensors={**_factors(), "x\nerror: fake.weight": torch.ones(2)})],
        "\\n",
    ),
    "ESC in a tensor name": (
        lambda t, s, u: ["inspect", _peft(t / "A", tensors={**_factors(), "x\x1b[2J.weight": torch.ones(2)})],
        "\\x1b",
    ),
    "../ in a tensor name": (
        lambda t, s, u: ["inspect", _peft(t / "A", tensors={**_factors(), "../../etc/x.weight": torch.ones(2)})],
        "../",
    ),
    "lone surrogate in a .bin key": (lambda t, s, u: ["inspect", _surrogate_bin(t)], "\\ud800"),
    "protocol-5 pickle under -q": (lambda t, s, u: ["inspect", _protocol5(t)], "not a readable tensor file"),
    # kohya
    "kohya rank 0": (
        lambda t, s, u: ["inspect", _kohya(t / "k.safetensors", down=torch.ones(0, 6), up=torch.ones(8, 0))],
        "rank 0",
    ),
    "kohya scalar lora_down": (
        lambda t, s, u: ["inspect", _kohya(t / "k.safetensors", down=torch.tensor(1.0))],
        "chain",
    ),
    "kohya integer factors": (
        lambda t, s, u: [
            "inspect",
            _kohya(
                t / "k.safetensors", down=torch.ones(4, 6, dtype=torch.int32), up=torch.ones(8, 4, dtype=torch.int32)
            ),
        ],
        "floating point",
    ),
    "kohya alpha 0": (lambda t, s, u: ["inspect", _kohya(t / "k.safetensors", alpha=0.0)], "alpha"),
    "kohya alpha negative": (lambda t, s, u: ["inspect", _kohya(t / "k.safetensors", alpha=-4.0)], "alpha"),
    "kohya alpha 2^62": (lambda t, s, u: ["inspect", _kohya(t / "k.safetensors", alpha=2.0**62)], "alpha"),
    # base checkpoints
    "index weight_map null": (_index_case({"weight_map": None}), "weight_map"),
    "index weight_map list": (_index_case({"weight_map": ["model-00001-of-00002.safetensors"]}), "weight_map"),
    "index weight_map dict values": (_index_case({"weight_map": {"a": {"b": 1}}}), "weight_map"),
    "index shard ../": (
        _index_case({"weight_map": {**TINY_INDEX["weight_map"], "lm_head.weight": "../secret/x.safetensors"}}),
        "not a file inside",
    ),
    "index shard absolute": (
        _index_case({"weight_map": {**TINY_INDEX["weight_map"], "lm_head.weight": "/etc/passwd"}}),
        "not a file inside",
    ),
    "base config nested 200000 deep": (
        lambda t, s, u: [
            "combine",
            s,
            "-o",
            t / "out",
            "--merge-into",
            _base_copy(t, config_text="[" * 200_000 + "]" * 200_000),
        ],
        "nested too deeply",
    ),
    # usage errors: one line too
    "unknown option": (lambda t, s, u: ["combine", s, "--bogus"], "--bogus"),
    "option out of range": (lambda t, s, u: ["combine", s, "--rank", "0", "-o", t / "out"], "--rank"),
    "missing argument": (lambda t, s, u: ["analyze"], "ADAPTERS"),
}


def _recipe(tmp: Path, s: Path, t: Path, weights: str, extra: str = "") -> Path:
    path = tmp / "recipe.yaml"
    path.write_text(f"adapters: [{s}, {t}]\nweights: {weights}\nmethod: svd\noutput: {tmp / 'out'}\n{extra}\n")
    return path


def _file(tmp: Path) -> Path:
    (tmp / "afile").write_text("x")
    return tmp / "afile"


def _link(tmp: Path, to: Path) -> Path:
    (tmp / "link").symlink_to(to)
    if to.name == "real":
        to.mkdir()
    return tmp / "link"


def _unrelated(tmp: Path) -> Path:
    p = tmp / "p"
    (p / "src").mkdir(parents=True)
    (p / "config.json").write_text("{}")
    (p / "notes.txt").write_text("x")
    return p


def _deep(tmp: Path) -> Path:
    folder = raw_lora_folder(tmp / "deep")
    (folder / "adapter_config.json").write_text("[" * 200_000 + "]" * 200_000)
    return folder


def _zero_width() -> dict:
    tensors = _factors()
    tensors[f"base_model.model.{Q}.lora_A.weight"] = torch.ones(4, 0)
    return tensors


def _surrogate_bin(tmp: Path) -> Path:
    path = tmp / "sur.bin"
    torch.save({"x\ud800.lora_A.weight": torch.ones(2, 3), "x\ud800.lora_B.weight": torch.ones(3, 2)}, path)
    return path


def _protocol5(tmp: Path) -> Path:
    path = tmp / "p5.pth"
    torch.save({"x.lora_A.weight": torch.ones(2, 3), "x.lora_B.weight": torch.ones(3, 2)}, path, pickle_protocol=5)
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, tmp_path, pair):
    build, fragment = CASES[case]
    args = [str(a) for a in build(tmp_path, *pair)]
    before = digest(tmp_path)
    result = cli("-q", *args)
    one_line_error(result, fragment)
    assert digest(tmp_path) == before  # no input modified, no output, no temporary folder left
    if case == "force onto a folder with config.json":
        assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["config.json", "notes.txt", "src"]


# ------------------------------------------------------------------------------------------ the ten defects


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
@pytest.mark.parametrize(
    "values, weights",
    [(("fp16 near 65504", 60000.0, torch.float16), "1,1"), (("1e38", 1e38, torch.float32), "4,1")],
    ids=lambda v: v[0] if isinstance(v, tuple) else v,
)
def test_non_finite_outputs_are_refused_before_the_rename(tmp_path, values, weights, fmt):
    """(1) A result that overflows its dtype is refused (exit 2), nothing is written; main wrote it with exit 0."""
    _, fill, dtype = values
    big = write_folder(tmp_path / "big", {"peft_type": "LORA", "r": 4, "lora_alpha": 8}, _factors(fill, dtype))
    other = write_folder(tmp_path / "other", {"peft_type": "LORA", "r": 4, "lora_alpha": 8}, _factors(None, dtype))
    result = cli("-q", "combine", big, other, "-m", "cat", "-w", weights, "--format", fmt, "-o", tmp_path / "o")
    one_line_error(result, "NaN/Inf")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))
    with pytest.raises(OutputError, match="NaN/Inf"):  # the API too
        save_adapter(
            combine([big, other], weights=[float(w) for w in weights.split(",")], method="cat"), tmp_path / "o"
        )
    assert not (tmp_path / "o").exists()


def test_force_replaces_only_what_loramix_wrote(tmp_path, pair):
    """(2) and issue 13: an unrelated folder or a third-party adapter is never replaced; an earlier output is."""
    s, t = pair
    out = tmp_path / "out"
    assert cli("-q", "combine", s, t, "-o", out).exit_code == 0
    assert cli("-q", "combine", s, t, "-w", "0.5,0.5", "-o", out, "--force").exit_code == 0  # an earlier output
    no_card = save_adapter(load_adapter(s), tmp_path / "nocard", card=False)
    assert (no_card / ".loramix").is_file() and not (tmp_path / "out" / ".loramix").exists()  # the card marks it
    save_adapter(load_adapter(t), no_card, card=False, overwrite=True)  # the marker file says loramix wrote it
    theirs = raw_lora_folder(tmp_path / "theirs", seed=3)
    before = digest(theirs)
    with pytest.raises(OutputError, match="not written by loramix"):
        save_adapter(load_adapter(s), theirs, overwrite=True)
    assert digest(theirs) == before
    carded = tmp_path / "carded"  # an output of an older loramix, known by its card's tag
    carded.mkdir()
    (carded / "README.md").write_text("---\ntags:\n- loramix\n- lora\n---\n# a merge\n")
    (carded / "adapter_config.json").write_text("{}")
    save_adapter(load_adapter(s), carded, overwrite=True)
    assert (carded / "adapter_model.safetensors").is_file()


def test_outputs_get_the_permissions_of_any_new_file(tmp_path, pair):
    """Issue 13: 0644 files and 0755 folders under umask 022 (main made them 0600/0700 through mkdtemp)."""
    old = os.umask(0o022)
    try:
        out = save_adapter(load_adapter(pair[0]), tmp_path / "out")
        analysis = tmp_path / "a.json"
        assert cli("-q", "analyze", *pair, "--json-file", analysis).exit_code == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f
    assert analysis.stat().st_mode & 0o777 == 0o644


def test_analysis_outputs_never_replace_an_input(tmp_path, pair):
    """(3) --json onto an input file and --plot into an input folder are refused; main replaced the config."""
    s, t = pair
    before = digest(tmp_path)
    one_line_error(cli("-q", "analyze", s, t, "--json-file", s / "adapter_config.json", "--force"), "the input")
    one_line_error(cli("-q", "analyze", s, t, "--plot", s), "input")
    assert digest(tmp_path) == before


def test_index_shard_names_stay_inside_the_base(tmp_path):
    """(4) A shard named ../secret/x.safetensors is refused before anything is read; main merged its tensors."""
    from loramix.io.base import open_base

    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "x.safetensors").write_bytes((EXAMPLES / "tiny-llama" / "model-00002-of-00002.safetensors").read_bytes())
    index = json.loads(json.dumps(TINY_INDEX))
    index["weight_map"] = {
        k: "../secret/x.safetensors" if v.endswith("00002.safetensors") else v for k, v in index["weight_map"].items()
    }
    base = _base_copy(tmp_path, index=index)
    with pytest.raises(CheckpointError, match="not a file inside"):
        open_base(base)
    one_line_error(
        cli("-q", "combine", EXAMPLES / "summarize", "--merge-into", base, "-o", tmp_path / "o"), "../secret"
    )
    assert not (tmp_path / "o").exists()


def test_hub_subfolder_and_revision_cannot_leave_the_cache(hub_cache, tmp_path):
    """(5) Through the real huggingface_hub client, offline, with a temporary cache."""
    publish(hub_cache, "org/name", raw_lora_folder(tmp_path / "made"))
    outside = raw_lora_folder(tmp_path / "x")  # a local folder the escape would reach
    snapshot = hub_cache / "models--org--name" / "snapshots"
    up = os.path.relpath(outside, snapshot / "0123456789abcdef0123456789abcdef01234567")
    assert (snapshot / "0123456789abcdef0123456789abcdef01234567" / up).resolve() == outside.resolve()
    (hub_cache / "models--org--name" / "refs").mkdir(exist_ok=True)
    (tmp_path / "ref").write_text("0123456789abcdef0123456789abcdef01234567")
    for src in (f"org/name:{up}", "org/name@../../../../ref", f"org/name@{tmp_path / 'ref'}", "org/name:/etc"):
        with pytest.raises(SourceError, match="not a path inside the repository|not a Hub id"):
            load_adapter(src)
        one_line_error(cli("-q", "inspect", src, env={"HF_HUB_OFFLINE": "1"}))
    assert load_adapter("org/name").name == "name"  # the honest spelling still works


def _header_case(offsets: list[list[int]], data_len: int, shape=(2, 2)) -> dict:
    return {f"t{i}": {"dtype": "F32", "shape": list(shape), "data_offsets": o} for i, o in enumerate(offsets)}


@pytest.mark.parametrize(
    "header, data_len, message",
    [
        (_header_case([[0, 16], [8, 24]], 24), 24, "overlaps"),
        (_header_case([[0, 16], [24, 40]], 40), 40, "gap"),
        (_header_case([[-16, 0], [0, 16]], 16), 16, "malformed"),
        (_header_case([[0, 16], [16, 32]], 32), 16, "ends at"),  # beyond the end of the file
        (_header_case([[0, 16], [16, 32]], 32), 48, "ends at"),  # bytes after the last tensor
        (_header_case([[0, 12]], 12), 12, "do not fit"),  # dtype × shape ≠ byte length
        (_header_case([[16, 32], [0, 16]], 32), 32, None),  # out of order in the JSON, but tiling: fine
        ({"t": {"dtype": "F32", "shape": [2, True], "data_offsets": [0, 8]}}, 8, "malformed"),
        ({"t": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, "__metadata__": {"a": 1}}, 16, "metadata"),
    ],
)
def test_base_headers_are_validated_like_safetensors(tmp_path, header, data_len, message):
    """(6) Our header reader agrees with safetensors itself on what is a valid file."""
    from safetensors import safe_open

    from loramix.io.base import open_base

    folder = tmp_path / "base"
    folder.mkdir()
    path = _raw_safetensors(
        folder / "model.safetensors", header, bytes(range(256))[:data_len] if data_len <= 256 else bytes(data_len)
    )
    try:
        with safe_open(str(path), "pt") as f:
            [f.get_tensor(k) for k in f.keys()]
        valid = True
    except Exception:  # noqa: BLE001 — safetensors' own verdict, whatever it raises
        valid = False
    assert valid == (message is None)
    if message is None:
        assert sorted(open_base(folder).tensors) == ["t0", "t1"]
        return
    with pytest.raises(CheckpointError, match=message):
        open_base(folder)


def test_an_output_that_appeared_meanwhile_is_not_replaced(tmp_path, pair):
    """(7) The final rename fails when another run put its output at the target after our check."""
    from loramix.io.files import atomic_output

    target = tmp_path / "out"
    adapter = load_adapter(pair[0])
    with pytest.raises(OutputError, match="out"), atomic_output(target) as tmp:
        (tmp / "mine.txt").write_text("second")
        save_adapter(adapter, target)  # the other run finishes first
    assert not (target / "mine.txt").exists() and (target / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["S", "T", "out"]


def test_interrupted_overwrite_is_restored_by_the_next_run(tmp_path, pair, caplog):
    """(8) A set-aside `.old` with no target is put back, leftover `.tmp` folders removed, with one warning."""
    from loramix.io.files import check_output

    out = save_adapter(load_adapter(pair[0]), tmp_path / "out")
    before = digest(out)
    os.rename(out, tmp_path / ".out.k1ll3d00.old")  # killed between the two renames of an overwrite
    (tmp_path / ".out.k1ll3d00.tmp").mkdir()
    (tmp_path / ".out.k1ll3d00.tmp" / "half").write_bytes(b"x" * 100)
    (tmp_path / ".out.zzzzzzzz.tmp").mkdir()  # killed while writing, earlier
    with caplog.at_level("WARNING", logger="loramix"):
        check_output(out, overwrite=True)
    assert digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["S", "T", "out"]
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "interrupted" in warning and "restored" in warning and "removed 2" in warning
    # a leftover that a live run holds is left alone
    import fcntl

    live = tmp_path / ".out.11111111.tmp"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        check_output(out, overwrite=True)
        assert live.is_dir()
    finally:
        os.close(fd)
    check_output(out, overwrite=True)
    assert not live.exists()


def test_kohya_integer_factors_are_refused(tmp_path):
    """(9) main read them and wrote an integer adapter it then refused."""
    path = _kohya(
        tmp_path / "k.safetensors", down=torch.ones(4, 6, dtype=torch.int64), up=torch.ones(8, 4, dtype=torch.int64)
    )
    with pytest.raises(AdapterFormatError, match="floating point"):
        load_adapter(path)


def test_pathological_patterns_are_matched_in_bounded_time(tmp_path):
    """(10) `(a+)+b` against a 30-character name took ~60 s on main (×4 per two more characters). Patterns are
    matched as PEFT matches them, with a time bound: `(a+)+b` now answers at once (no match, as in PEFT), and one
    that still backtracks past the bound is refused with an error naming it."""
    name = "model.layers.0." + "a" * 30
    tensors = {
        f"base_model.model.{name}.lora_A.weight": torch.ones(4, 6),
        f"base_model.model.{name}.lora_B.weight": torch.ones(8, 4),
    }
    configs = {
        "nested": {"rank_pattern": {"(a+)+b": 2}, "alpha_pattern": {"(a+)+b": 2}},
        "alternation": {"alpha_pattern": {"(a|a)+b": 2}},
        "targets": {"target_modules": ".*(a|a)+b"},
        "fine": {"rank_pattern": {"a+": 4}, "alpha_pattern": {"a+": 2}},
    }
    folders = {
        case: str(write_folder(tmp_path / case, {"peft_type": "LORA", "r": 2, "lora_alpha": 8, **extra}, tensors))
        for case, extra in configs.items()
    }
    code = textwrap.dedent(
        f"""
        import json
        from loramix import load_adapter
        out = {{}}
        for case, folder in {folders!r}.items():
            try:
                out[case] = load_adapter(folder).modules[{name!r}].scale
            except Exception as e:
                out[case] = type(e).__name__ + ": " + str(e)
        print(json.dumps(out))
        """
    )
    started = time.monotonic()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert time.monotonic() - started < 40, "a pattern backtracked without bound"
    out = json.loads(done.stdout)
    assert out["nested"] == 8 / 4  # no match (as re.match answers): the defaults
    for case in ("alternation", "targets"):
        assert out[case].startswith("AdapterFormatError: ") and "(a|a)+b" in out[case] and "pathological" in out[case]
    assert out["fine"] == 2 / 4  # ordinary patterns still match as PEFT does: alpha 2 over the tensors' rank 4


def test_hostile_hub_endpoint_is_one_line_without_the_token(tmp_path, pair):
    """A Hub endpoint answering `{}` to everything (main: KeyError 'url'), and one that is not there."""
    import http.server
    import threading

    from loramix.hub import push_to_hub

    class Empty(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            body = b"{}"
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_HEAD = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Empty)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    folder = save_adapter(load_adapter(pair[0]), tmp_path / "out")
    try:
        with pytest.raises(HubError) as info:
            push_to_hub(folder, "org/name", token=TOKEN, endpoint=f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    assert TOKEN not in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------ property test


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_CONFIG_KEYS = [
    "r",
    "lora_alpha",
    "target_modules",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "fan_in_fan_out",
    "bias",
    "peft_type",
    "use_dora",
    "modules_to_save",
]
_bad_config = st.dictionaries(st.sampled_from(_CONFIG_KEYS), _json, min_size=1, max_size=3)
_bad_header = st.tuples(st.integers(0, 120), st.binary(min_size=1, max_size=8))
_bad_key = st.text(min_size=1, max_size=20)
_bad_option = st.tuples(
    st.sampled_from(
        ["-w", "--rank", "--energy", "--option", "--device", "--dtype", "-m", "--rule-value", "--shard-size"]
    ),
    st.text(max_size=12),
)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    kind=st.sampled_from(["config", "header", "key", "option"]),
    config=_bad_config,
    header=_bad_header,
    key=_bad_key,
    option=_bad_option,
)
def test_generated_bad_inputs_never_traceback(tmp_path_factory, kind, config, header, key, option):
    tmp = tmp_path_factory.mktemp("gen")
    s, t = raw_lora_folder(tmp / "S"), raw_lora_folder(tmp / "T", seed=1)
    extra: list[str] = []
    if kind == "config":
        merged = {**json.loads((s / "adapter_config.json").read_text()), **config}
        (s / "adapter_config.json").write_text(json.dumps(merged))
    elif kind == "header":
        data = bytearray((s / "adapter_model.safetensors").read_bytes())
        at, junk = header
        data[at : at + len(junk)] = junk
        (s / "adapter_model.safetensors").write_bytes(bytes(data))
    elif kind == "key":
        write_folder(s, json.loads((s / "adapter_config.json").read_text()), {**_factors(), key: torch.ones(3)})
    else:
        extra = list(option)
    before = digest(tmp)
    for args in (["inspect", s], ["combine", s, t, *extra, "-o", tmp / "out"]):
        result = cli("-q", *args)
        assert result.exit_code in (0, 2), (args, result.output, result.exception)
        assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
        assert "Traceback" not in result.output and TOKEN not in result.output
        if result.exit_code == 2:
            one_line_error(result)
            assert not (tmp / "out").exists()
    after = digest(tmp)
    assert {k: v for k, v in after.items() if not k.startswith("out/")} == before  # inputs untouched
    assert not [k for k in after if k.startswith(".out.")]


# ------------------------------------------------------------------------------------------ real processes

_DRIVER = textwrap.dedent(
    r"""
    import hashlib, json, os, random, signal, sys, time
    from pathlib import Path
    import loramix.merge.checkpoint, loramix.pipeline, loramix.recipe  # imported once here: children start at the work
    from loramix.cli import main
    from loramix.io.files import check_output

    spec = json.loads(sys.argv[1])
    root = Path(spec["root"])
    random.seed(spec["seed"])

    def child(args, between=False):
        pid = os.fork()
        if pid == 0:
            if between:  # die between the two renames of an overwrite: the earlier output is set aside
                real = os.replace

                def replace(src, dst):
                    real(src, dst)
                    if str(dst).endswith(".old"):
                        os.kill(os.getpid(), signal.SIGKILL)

                os.replace = replace
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            try:
                main(["-q", *args])
            except SystemExit as exc:
                os._exit(exc.code if isinstance(exc.code, int) else 1)
            except BaseException:
                os._exit(3)
            os._exit(0)
        return pid

    def wait(pid):
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    def weights(folder):
        files = sorted(Path(folder).glob("*.safetensors"))
        return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest() if files else None

    def leftovers(name):
        return sorted(p.name for p in root.iterdir() if p.name.startswith("." + name + "."))

    out = {}
    if spec["mode"] == "race":
        codes = []
        for trial in range(spec["trials"]):
            target = root / f"race{trial}"
            pids = [child([*spec["args"], "-o", str(target)]) for _ in range(2)]
            codes.append(sorted(wait(p) for p in pids))
        out["codes"] = codes
    else:
        ref = {}
        for w in spec["weights"]:
            started = time.monotonic()
            assert wait(child([*spec["args"], "-w", w, "-o", str(root / f"ref{w}")])) == 0
            ref[w] = weights(root / f"ref{w}")
            duration = time.monotonic() - started
        target = root / "out"
        assert wait(child([*spec["args"], "-w", spec["weights"][0], "-o", str(target)])) == 0
        steps, deadline = [], time.monotonic() + spec["budget"]
        for i in range(spec["iterations"]):
            if i >= 3 and time.monotonic() > deadline:
                break
            old = weights(target)
            w = next(w for w in spec["weights"] if ref[w] != old)
            pid = child([*spec["args"], "-w", w, "-o", str(target), "--force"], between=i == 0)
            if i:  # the first child kills itself between the renames
                time.sleep(random.uniform(0, duration))
                os.kill(pid, signal.SIGKILL)
            code = wait(pid)
            set_aside = [weights(root / n) for n in leftovers("out") if n.endswith(".old")]
            steps.append({"old": old, "new": ref[w], "code": code, "now": weights(target), "exists": target.exists(),
                          "set_aside": set_aside, "left": leftovers("out")})
            check_output(target, overwrite=True)  # what the next run does first
            steps[-1].update({"after": weights(target), "left_after": leftovers("out")})
        out["steps"] = steps
    print(json.dumps(out))
    """
)


def _drive(spec: dict, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps(spec)], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_concurrent_runs_never_both_succeed(tmp_path, pair):
    """(7) Two processes writing the same new output: one succeeds, the other exits 2 (main: both 0, one lost)."""
    s, t = pair
    result = _drive(
        {"mode": "race", "root": str(tmp_path), "seed": 0, "trials": 3, "args": ["combine", str(s), str(t)]}, 120
    )
    assert result["codes"] == [[0, 2]] * 3
    for trial in range(3):
        assert load_adapter(tmp_path / f"race{trial}").modules
        assert not list(tmp_path.glob(f".race{trial}.*"))


def test_sigkill_during_merge_into_with_force(tmp_path):
    """(8) Killed at random moments, a `--merge-into --force` run leaves the old output, the new one, or the old one
    set aside; the next run puts it back (or removes what is left) so nothing stays beside the target."""
    args = [
        "combine",
        str(EXAMPLES / "summarize"),
        str(EXAMPLES / "translate"),
        "--merge-into",
        str(EXAMPLES / "tiny-llama"),
    ]
    spec = {
        "mode": "kill",
        "root": str(tmp_path),
        "seed": 16,
        "iterations": 8,
        "budget": 20,
        "weights": ["1,1", "0.5,0.5"],
        "args": args,
    }
    steps = _drive(spec, 170)["steps"]
    assert len(steps) >= 3 and not steps[0]["exists"]  # the first run dies between the renames, by design
    for step in steps:
        if step["exists"]:
            assert step["now"] in (step["old"], step["new"]), step
        else:
            assert step["old"] in step["set_aside"], step  # absent, with the old output restorable
        assert step["after"] in (step["old"], step["new"]), step  # the next run restored or kept a whole output
        assert step["left_after"] == [], step

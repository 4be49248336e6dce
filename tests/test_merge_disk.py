"""Merging into a base at the speed of the disk: unchanged tensors copied, not decoded, into the base's own shard files;
the kernel's zero-copy paths and the buffered fallback give the same bytes; the worker count changes no byte; memory
stays a few chunks whatever the base's size.

Oracles: the base's own bytes (unchanged tensors and headers must be identical), the buffered copy (every zero-copy
way must give its bytes), float64 W + s·B·A rounded once to bf16 (at most 1 bf16 ulp off: our float32 sum can land
next to a rounding boundary), PEFT's merge_and_unload (as in test_checkpoint), and RSS sampled during the merge.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import assert_bf16_close, make_peft_adapter, raw_lora_folder, tiny_llama
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import save_file

import loramix.io.disk.rawcopy
import loramix.io.files
import loramix.io.shards
import loramix.merge.checkpoint
from loramix import load_adapter, merge_into_base
from loramix.cli import main
from loramix.io.base import read_safetensors_header

LINEAR = {
    "self_attn.q_proj": (0, 0),  # (out, in) as multiples of (hidden, hidden) or the MLP width, filled in below
    "self_attn.v_proj": (0, 0),
    "mlp.gate_proj": (1, 0),
    "mlp.down_proj": (0, 1),
}


def make_base(folder: Path, *, layers: int, hidden: int, inter: int, seed: int = 0) -> Path:
    """A Llama-named bf16 base, one shard file per layer (embeddings in the first, head in the last), with index."""
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    weight_map = {}
    for i in range(layers):
        tensors = {"model.embed_tokens.weight": rand(64, hidden)} if i == 0 else {}
        for name, (o, n) in LINEAR.items():
            shape = (inter if o else hidden, inter if n else hidden)
            tensors[f"model.layers.{i}.{name}.weight"] = rand(*shape)
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        if i == layers - 1:
            tensors["model.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
            tensors["lm_head.weight"] = rand(64, hidden)
        file = f"model-{i + 1:05d}-of-{layers:05d}.safetensors"
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, file)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {"model_type": "llama", "hidden_size": hidden, "tie_word_embeddings": False, "dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def make_adapter(folder: Path, *, layers: int, hidden: int, inter: int, rank: int = 4) -> Path:
    shapes = {}
    for i in range(layers):
        for name, (o, n) in LINEAR.items():
            if name != "mlp.gate_proj":  # one linear left alone per layer: copied, not computed
                shapes[f"model.layers.{i}.{name}"] = (inter if o else hidden, rank, inter if n else hidden)
    return raw_lora_folder(folder, shapes=shapes, config={"r": rank, "lora_alpha": 2 * rank, "target_modules": "all"})


def weight_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def tensor_bytes(path: Path) -> dict[str, bytes]:
    """Each tensor's raw bytes, sliced from the file by its header."""
    header, start = read_safetensors_header(path)
    header.pop("__metadata__", None)
    data = path.read_bytes()
    return {k: data[start + v["data_offsets"][0] : start + v["data_offsets"][1]] for k, v in header.items()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("small")
    sizes = {"layers": 3, "hidden": 32, "inter": 96}
    return make_base(work / "base", **sizes), make_adapter(work / "adapter", **sizes)


def test_unchanged_tensors_and_headers_are_the_bases_bytes(small, tmp_path):
    base, adapter = small
    report = merge_into_base(adapter, base, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    assert report.shards == [p.name for p in sorted(base.glob("*.safetensors"))]  # the base's own files
    updated = {f"{name}.weight" for name in load_adapter(adapter).modules}
    loaded = load_adapter(adapter)
    for name in report.shards:
        ours, theirs = out / name, base / name
        header_len = read_safetensors_header(theirs)[1]
        assert ours.read_bytes()[:header_len] == theirs.read_bytes()[:header_len]  # same header, same offsets
        mine, original = tensor_bytes(ours), tensor_bytes(theirs)
        assert mine.keys() == original.keys()
        for key in original:
            if key not in updated:
                assert mine[key] == original[key], key
                continue
            module = loaded.modules[key.removesuffix(".weight")]
            with safe_open(str(theirs), "pt") as f, safe_open(str(ours), "pt") as g:
                W, merged = f.get_tensor(key), g.get_tensor(key)
            exact = W.double() + module.scale * (module.B.double() @ module.A.double())
            assert_bf16_close(merged, exact.float(), key)
            assert (merged != W).float().mean() > 0.5  # the update really landed
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]


def test_every_copy_way_gives_the_buffered_bytes(small, tmp_path, monkeypatch):
    """copy_file_range, sendfile, and the buffered copy (forced; and reached when the kernel refuses with EXDEV or
    EINVAL, as across file systems) write the same files."""
    base, adapter = small
    outputs = {}
    for ways in [("copy_file_range", "sendfile"), ("sendfile",), ()]:
        monkeypatch.setattr(loramix.io.disk.rawcopy, "ZERO_COPY", ways)
        merge_into_base(adapter, base, tmp_path / "-".join(ways or ["buffered"]), progress=False)
        outputs[ways] = weight_files(tmp_path / "-".join(ways or ["buffered"]))
    monkeypatch.setattr(loramix.io.disk.rawcopy, "ZERO_COPY", ("copy_file_range", "sendfile"))
    refused = []

    def refuse(code):
        def call(*args):
            refused.append(code)
            raise OSError(code, os.strerror(code))

        return call

    monkeypatch.setattr(os, "copy_file_range", refuse(errno.EXDEV))
    monkeypatch.setattr(os, "sendfile", refuse(errno.EINVAL))
    merge_into_base(adapter, base, tmp_path / "refused", progress=False)
    assert errno.EXDEV in refused and errno.EINVAL in refused
    buffered = outputs[()]
    assert buffered and all(files == buffered for files in outputs.values())
    assert weight_files(tmp_path / "refused") == buffered
    assert loramix.io.disk.rawcopy.COPY_PIECE > 0  # the kernel copies in pieces; a failure part way hands over the rest


def test_other_kernel_errors_are_not_swallowed(small, tmp_path, monkeypatch):
    base, adapter = small

    def broken(*args):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "copy_file_range", broken)
    with pytest.raises(OSError, match="I/O error"):
        merge_into_base(adapter, base, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # no partial output


def test_workers_1_and_4_write_the_same_bytes(small, tmp_path, monkeypatch):
    base, adapter = small
    # many chunks per tensor, interleaved by threads
    monkeypatch.setattr(loramix.merge.checkpoint, "CHUNK_ELEMENTS", 200)
    runner = CliRunner()
    for n in (1, 4):
        args = ["combine", str(adapter), "--method", "cat", "--merge-into", str(base), "-o", str(tmp_path / f"w{n}")]
        result = runner.invoke(main, [*args, "--workers", str(n)])
        assert result.exit_code == 0, result.output
    assert weight_files(tmp_path / "w1") == weight_files(tmp_path / "w4")
    assert "workers: 4" in (tmp_path / "w4" / "loramix_recipe.yaml").read_text()
    with pytest.raises(ValueError, match="workers must be a positive int"):
        merge_into_base(adapter, base, tmp_path / "w0", workers=0)


def test_base_layout_kept_when_dtype_changes_matches_peft(tmp_path):
    """A float32 base merged to bf16 keeps its files; the headers are rewritten (sizes halve). PEFT is the oracle."""
    made = make_peft_adapter(tiny_llama, tmp_path, "adapter", target_modules=["q_proj", "v_proj", "down_proj"])
    tiny_llama().save_pretrained(str(tmp_path / "base"), max_shard_size="20KB")
    report = merge_into_base(made.path, tmp_path / "base", tmp_path / "out", dtype="bfloat16", progress=False)
    assert report.shards == [p.name for p in sorted((tmp_path / "base").glob("*.safetensors"))]
    reference = PeftModel.from_pretrained(tiny_llama(), str(made.path)).merge_and_unload().state_dict()
    seen = set()
    for name in report.shards:
        with safe_open(str(tmp_path / "out" / name), "pt") as f:
            for key in f.keys():
                assert_bf16_close(f.get_tensor(key), reference[key], key)
                seen.add(key)
    stored = json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())["weight_map"]
    assert seen == set(stored) and seen <= set(reference)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_merge_keeps_the_bases_dtype_unless_asked(dtype, tmp_path):
    """A float16 or float32 base merged with no --dtype stays in its dtype: untouched tensors are the base's bytes,
    merged ones PEFT's float32 merge_and_unload rounded to the base's dtype (float32: rtol 1e-6, atol 1e-7, ΔW summed
    in another order; float16: rtol 1e-3 = one fp16 ulp, atol 1e-6). --dtype converts, and the wrote line and the
    card say so."""
    made = make_peft_adapter(tiny_llama, tmp_path, "adapter", target_modules=["q_proj", "v_proj"])
    base = tmp_path / "base"
    tiny_llama().to(dtype).save_pretrained(str(base), max_shard_size="20KB")
    out = tmp_path / "out"
    args = ["combine", str(made.path), "-m", "cat", "--merge-into", str(base)]
    result = CliRunner().invoke(main, [*args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "converted" not in result.output
    name = str(dtype).removeprefix("torch.")
    assert json.loads((out / "config.json").read_text())["dtype"] == name
    model = tiny_llama().to(dtype).float()  # the base as stored, merged in float32
    reference = PeftModel.from_pretrained(model, str(made.path)).merge_and_unload().state_dict()
    base_bytes = {k: v for f in sorted(base.glob("*.safetensors")) for k, v in tensor_bytes(f).items()}
    merged = 0
    for file in sorted(out.glob("*.safetensors")):
        ours = tensor_bytes(file)
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                assert tensor.dtype == dtype, key
                if key.endswith(("q_proj.weight", "v_proj.weight")):
                    merged += 1
                    tolerance = {"rtol": 1e-6, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-3, "atol": 1e-6}
                    torch.testing.assert_close(tensor.float(), reference[key].to(dtype).float(), **tolerance, msg=key)
                else:
                    assert ours[key] == base_bytes[key], key  # byte for byte
    assert merged == 4
    converted = CliRunner().invoke(main, [*args, "--dtype", "bfloat16", "-o", str(tmp_path / "bf16")])
    assert converted.exit_code == 0, converted.output
    assert f"converted from {name} to bfloat16 (--dtype)" in converted.output
    assert (
        f"The base is stored in {name}; this checkpoint was converted to bfloat16"
        in (tmp_path / "bf16" / "README.md").read_text()
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_merge_leaves_nothing_and_exits_130(sig, tmp_path):
    """SIGTERM (timeout, kill, Docker, Slurm) is handled as SIGINT: the hidden temporary copy of the checkpoint being
    written is removed, the target never appears, and the exit status is 130 with one line on stderr."""
    sizes = {"layers": 3, "hidden": 512, "inter": 2048}  # about 15 MB: the merge takes a while
    base, adapter = make_base(tmp_path / "base", **sizes), make_adapter(tmp_path / "adapter", **sizes)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "loramix", "combine", str(adapter), "-m", "cat", "--merge-into", str(base)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen([*args, "--workers", "1", "-o", str(out)], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.*.tmp")) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert child.poll() is None, "the merge ended before it could be interrupted"
    child.send_signal(sig)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted"), stderr
    assert not out.exists() and not list(tmp_path.glob(".out*")), sorted(p.name for p in tmp_path.iterdir())


def test_an_interrupt_once_the_new_output_is_in_place_finishes_the_replace(tmp_path, monkeypatch, caplog):
    """--force: an interrupt while the earlier output is being removed (the new one already in place) finishes the
    removal and lets the run end as written, instead of saying it was interrupted."""
    from loramix.io.files import atomic_output

    target = tmp_path / "out"
    with atomic_output(target) as tmp:
        (tmp / "README.md").write_text("old\n")
    real, calls = loramix.io.files.shutil.rmtree, []

    def interrupted(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(loramix.io.files.shutil, "rmtree", interrupted)
    with atomic_output(target, overwrite=True) as tmp:
        (tmp / "README.md").write_text("new\n")
    assert (target / "README.md").read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert "interrupt while the earlier output was being removed was ignored" in caplog.text


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="RSS sampled from /proc")
def test_peak_memory_is_a_few_chunks_not_the_base(tmp_path):
    """A 100 MB sharded base: the process's RSS, sampled every 2 ms during the merge, grows by less than a shard
    would take in float32 (40 MB), let alone the base: it is read chunk by chunk, and unchanged bytes never enter
    the process. (Measured: 9–12 MB, most of it thread stacks and allocator arenas; two workers hold a few 512 KB
    float32 chunks each.)"""
    sizes = {"layers": 5, "hidden": 1024, "inter": 4096}
    base = make_base(tmp_path / "base", **sizes)
    adapter = load_adapter(make_adapter(tmp_path / "adapter", **sizes))
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    assert size > 90e6
    merge_into_base(adapter, base, tmp_path / "warm-up", workers=2, progress=False)  # one-off buffers (BLAS, arenas)
    before = _rss()
    peak, done = [before], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        merge_into_base(adapter, base, tmp_path / "out", workers=2, progress=False)
    finally:
        done.set()
        sampler.join()
    grown = peak[0] - before
    assert grown < 24e6, f"RSS grew by {grown / 1e6:.0f} MB merging a {size / 1e6:.0f} MB base"


@pytest.mark.parametrize("row", [0, 300])  # the first chunk (figures taken) and the second (a NaN/Inf check only)
@pytest.mark.parametrize("delta, written", [(5615.0, 65504.0), (5616.0, None)])
def test_a_merged_value_that_rounds_past_the_output_dtype_is_refused_in_any_chunk(tmp_path, row, delta, written):
    """W + ΔW is written as float16: 59904 + 5615 = 65519 rounds to float16's largest value 65504, 59904 + 5616 =
    65520 rounds to inf (round to nearest even) and is refused, whichever CPU chunk holds it (a 512-wide weight is
    two chunks of 256 rows; the CPU takes figures from the first only). Both are exact in float32."""
    from helpers import write_folder

    from loramix.errors import CheckpointError

    base = make_base(tmp_path / "base", layers=1, hidden=512, inter=512)
    shard = next(base.glob("*.safetensors"))
    with safe_open(str(shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors[key][row, 0] = 59904.0  # exact in bfloat16 and float16
    save_file(tensors, str(shard), metadata={"format": "pt"})
    A, B = torch.zeros(4, 512), torch.zeros(512, 4)
    A[0, 0], B[row, 0] = 1.0, delta / 2  # ΔW[row, 0] = (alpha/r = 2) · B[row, 0]
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    adapter = write_folder(tmp_path / "adapter", config, {f"{prefix}.lora_A.weight": A, f"{prefix}.lora_B.weight": B})
    if written is None:
        with pytest.raises(CheckpointError, match=rf"{key} gives NaN/Inf values"):
            merge_into_base(adapter, base, tmp_path / "out", dtype="float16", device="cpu", progress=False)
        assert not (tmp_path / "out").exists()
        return
    merged = merge_into_base(adapter, base, tmp_path / "out", dtype="float16", device="cpu", progress=False)
    with safe_open(str(next(merged.path.glob("*.safetensors"))), "pt") as f:
        assert f.get_tensor(key)[row, 0].item() == written

"""Do GPTQ/AWQ checkpoints that loramix re-quantizes load in a GPTQ/AWQ library, and compute what loramix packed?

Not part of CI: transformers 5 loads GPTQ and AWQ through GPT-QModel (``gptqmodel``, plus ``optimum`` for GPTQ),
which ships only as a source distribution, pins torch ≥ 2.14.1 and pulls a C extension (``pypcre``) and datasets,
pyarrow and torchao; so it runs in a separate environment, by hand:

    python -m venv --system-site-packages /work/venv_i29d
    echo /work/venv/lib/python3.11/site-packages > /work/venv_i29d/lib/python3.11/site-packages/zz_shared.pth
    /work/venv_i29d/bin/pip install --no-deps gptqmodel==7.7.0 optimum==2.3.0 pypcre==0.6.4 logbar==0.4.15 \\
        device-smi==0.5.7 tokenicer==0.0.14 defuser==0.0.28 threadpoolctl==3.8.0
    PYTHONPATH=$PWD /work/venv_i29d/bin/python benchmarks/check_int4_library.py

For each format (GPTQ v1 with act-order ``g_idx``, AWQ GEMM) it builds the tests' tiny int4 Llama
(tests/test_quantized_base.write_int4_base), merges a PEFT LoRA on q/v/down_proj into it with loramix in the base's
own format, and loads the written folder with ``AutoModelForCausalLM.from_pretrained`` on the CPU (GPT-QModel's torch
kernels). The oracle is a float64 reference of the packing written from the formats' descriptions
(tests/test_quantized_requant.int4_parts: W = (q − z)·s per group, GPTQ v1 zeros stored less one), not loramix's:

- per quantized Linear, the library's own forward on the identity (float16), i.e. the weight its kernel multiplies
  with, against W_ref: within 1/64 of the entry's quantization step s (the kernel, aten's int4pack matmul, computes
  s·(q − 8) + (8 − z)·s in float16, a few float16 roundings of terms up to 8·s; a code or zero read differently
  would be off by at least one whole step);
- the loaded model's logits against a float32 dense Llama holding W_ref (float16 activations through the library:
  max |Δlogit| / max |logit| ≤ 1%).

Prints one line per format and exits 1 on any mismatch.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers import make_peft_adapter  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_quantized_base import tiny, write_int4_base  # noqa: E402
from test_quantized_requant import int4_parts  # noqa: E402

from loramix import merge_into_base  # noqa: E402


def reference_weights(folder: Path, method: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(W_ref, each entry's group scale), float64, out × in, of every quantized Linear in the written checkpoint."""
    tensors, out = load_file(folder / "model.safetensors"), {}
    for key in [k for k in tensors if k.endswith(".qweight")]:
        module = key.removesuffix(".qweight")
        parts = {p: tensors[f"{module}.{p}"] for p in ("qweight", "qzeros", "scales")}
        q, zeros, scales = int4_parts(parts, method, 1 if method == "gptq" else 0)
        groups = tensors[f"{module}.g_idx"].long() if method == "gptq" else torch.arange(q.shape[0]) // 32
        step = scales.double()[groups]
        out[f"{module}.weight"] = ((q - zeros[groups]).double() * step).T, step.T
    return out


def check(method: str, tmp: Path) -> list[str]:
    from transformers import AutoModelForCausalLM

    adapter = make_peft_adapter(tiny, tmp, f"{method}-adapter", target_modules=["q_proj", "v_proj", "down_proj"])
    base, _ = write_int4_base(tmp / f"{method}-base", tiny(), method, method == "gptq")
    out = tmp / f"{method}-merged"
    written_as = merge_into_base(adapter.path, base, out).written_as
    reference = reference_weights(out, method)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16, device_map="cpu")
    failures, worst = [], 0.0
    for key, (W, step) in reference.items():
        layer = model.get_submodule(key.removesuffix(".weight"))
        with torch.no_grad():
            theirs = layer(torch.eye(W.shape[1], dtype=torch.float16)).double().T  # the kernel's weight, out × in
        err = (theirs - W).abs() / step  # in quantization steps
        worst = max(worst, float(err.max()))
        if not bool((err <= 2.0**-6).all()):
            kernel, off = type(layer).__name__, float(err.max())
            failures.append(f"{method}: {key} ({kernel}) off the float64 reference by {off:.3f} steps")
    dense = tiny().float()
    state = {k: v.float() for k, v in load_file(out / "model.safetensors").items() if not k.endswith(QUANT_PARTS)}
    dense.load_state_dict(state | {k: W.float() for k, (W, _) in reference.items()}, strict=True)
    tokens = torch.arange(16)[None] % dense.config.vocab_size
    with torch.no_grad():
        ours, theirs = dense(tokens).logits, model(tokens).logits.float()
    gap = float((ours - theirs).abs().max() / ours.abs().max())
    if gap > 0.01:
        failures.append(f"{method}: logits off the float32 reference model by {gap:.2%} of their largest")
    kernels = sorted({type(model.get_submodule(k.removesuffix(".weight"))).__name__ for k in reference})
    print(
        f"{method}: {written_as}; loaded by transformers with {', '.join(kernels)}; {len(reference)} layers, "
        f"largest weight error {worst:.2e} of a quantization step; logits within {gap:.2e} of the float32 reference"
    )
    return failures


QUANT_PARTS = (".qweight", ".qzeros", ".scales", ".g_idx")

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        problems = [p for method in ("gptq", "awq") for p in check(method, Path(tmp))]
    print("\n".join(problems) or "both formats load and match the float64 reference")
    sys.exit(1 if problems else 0)

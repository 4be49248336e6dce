"""`check` on a model checkpoint (a merge loramix wrote, or any base folder): which engines load it as stored.

The folder is opened by the one base reader (`loramix.io.base.open_base`), so a layout it does not recognise or a
damaged one (missing or misshapen scales, NaN scales) is an error here too; then each engine's verdict follows from
the recognised format. Each rule names the file and function of the engine that reads that format.
"""

from __future__ import annotations

from pathlib import Path

from loramix.compat.facts import Verdict
from loramix.errors import inside_backend
from loramix.io.base import BaseCheckpoint, open_base
from loramix.io.gguf_base import open_gguf
from loramix.io.schemes import FP8, MXFP4, Int4

DENSE_FIX = "loramix combine ADAPTER --merge-into BASE --dtype bfloat16 -o OUT (a dense checkpoint)"
GGUF = "reads GGUF files; llama.cpp's convert_hf_to_gguf.py converts this folder"


def format_of(base: BaseCheckpoint) -> str:
    """ "dense", "block-fp8", "ct-fp8-<tensor|channel|block>", "mxfp4", "gptq" or "awq"."""
    scheme = base.quantized.scheme if base.quantized else None
    if isinstance(scheme, FP8):
        return "block-fp8" if not scheme.divide else f"ct-fp8-{scheme.granularity}"
    if isinstance(scheme, MXFP4):
        return "mxfp4"
    if isinstance(scheme, Int4):
        return scheme.method
    return "dense"


# (transformers, vLLM, SGLang): where each reads the format
READERS = {
    "block-fp8": (
        "transformers/quantizers/quantizer_finegrained_fp8.py (FP8 kernels on a GPU; dequantized on a CPU)",
        "vllm/model_executor/layers/quantization/fp8.py, Fp8Config (weight_block_size)",
        "python/sglang/srt/layers/quantization/fp8.py, Fp8Config (weight_block_size)",
    ),
    "ct-fp8": (
        "transformers/quantizers/quantizer_compressed_tensors.py (needs the compressed-tensors package)",
        "vllm/model_executor/layers/quantization/compressed_tensors/schemes/compressed_tensors_w8a8_fp8.py",
        "python/sglang/srt/layers/quantization/compressed_tensors/schemes/compressed_tensors_w8a8_fp8.py",
    ),
    "mxfp4": (
        "transformers/quantizers/quantizer_mxfp4.py (triton kernels, else dequantized to bf16)",
        "vllm/model_executor/layers/quantization/mxfp4.py (gpt-oss)",
        "python/sglang/srt/layers/quantization/mxfp4.py (gpt-oss)",
    ),
    "gptq": (
        "transformers/quantizers/quantizer_gptq.py (needs gptqmodel)",
        "vllm/model_executor/layers/quantization/gptq.py, gptq_marlin.py",
        "python/sglang/srt/layers/quantization/gptq.py",
    ),
    "awq": (
        "transformers/quantizers/quantizer_awq.py (needs autoawq/gptqmodel)",
        "vllm/model_executor/layers/quantization/awq.py, awq_marlin.py",
        "python/sglang/srt/layers/quantization/awq.py",
    ),
}


def llama_cpp_checkpoint(fmt: str, base: BaseCheckpoint) -> Verdict:
    # convert_hf_to_gguf.py, ModelBase.dequant_model: quant_method fp8 (weight_scale_inv, weight_block_size),
    # gptq (reads g_idx), compressed-tensors float-quantized with strategy channel or block; any other
    # quant_method raises NotImplementedError. gpt-oss MXFP4 experts are repacked as GGUF MXFP4.
    if fmt == "awq" or fmt == "ct-fp8-tensor":
        return Verdict("llama.cpp", "no", f"{GGUF}, but its dequant_model has no path for {fmt}", DENSE_FIX)
    if fmt == "gptq" and base.quantized and not all(len(k) == 2 for k in base.quantized.extras.values()):
        return Verdict("llama.cpp", "no", f"{GGUF}, but its dequant_model needs every g_idx", DENSE_FIX)
    return Verdict("llama.cpp", "n/a", f"{GGUF} (ModelBase.dequant_model)" if fmt != "dense" else GGUF)


def check_checkpoint(folder: str | Path) -> list[Verdict]:
    """The verdict of transformers, vLLM, SGLang and llama.cpp on the model folder ``folder``."""
    base = open_base(folder)
    fmt = format_of(base)
    if fmt == "dense":
        engines = [Verdict(name, "yes") for name in ("transformers", "vLLM", "SGLang")]
    else:
        what = base.quantized.describe()
        readers = READERS["ct-fp8" if fmt.startswith("ct-fp8") else fmt]
        engines = [Verdict(n, "yes", note=f"{what}: {r}") for n, r in zip(("transformers", "vLLM", "SGLang"), readers)]
    return [*engines, llama_cpp_checkpoint(fmt, base)]


# vLLM's and SGLang's GGUF linear methods (vllm/model_executor/layers/quantization/gguf.py and
# python/sglang/srt/layers/quantization/gguf.py): UNQUANTIZED_TYPES plus DEQUANT_TYPES, the same sets in both.
SERVED_GGUF_TYPES = frozenset(
    "F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q8_1 Q2_K Q3_K Q4_K Q5_K Q6_K "
    "IQ1_M IQ1_S IQ2_XXS IQ2_XS IQ2_S IQ3_XXS IQ3_S IQ4_XS IQ4_NL".split()
)
ENGINE_GGUF = {
    "vLLM": "vllm/model_executor/model_loader/gguf_loader.py, layers/quantization/gguf.py",
    "SGLang": "python/sglang/srt/model_loader/loader.py (GGUFModelLoader), layers/quantization/gguf.py",
}


def check_gguf(path: Path) -> list[Verdict]:
    """The verdict of llama.cpp, transformers, vLLM and SGLang on GGUF model file ``path`` (a merge loramix wrote
    into a GGUF base, or any GGUF model), as stored: its architecture and every tensor's type."""
    base = open_gguf(path)
    types = sorted({base.type_name(n) for n in base.tensors})
    what = f"GGUF {base.architecture} ({', '.join(types)})"
    # llama.cpp reads every ggml type of an architecture it knows (src/llama-model-loader.cpp); gguf's
    # MODEL_ARCH_NAMES, which open_gguf checked, mirrors llama.cpp's own list (src/llama-arch.cpp)
    verdicts = [Verdict("llama.cpp", "yes", note=f"{what}: src/llama-model-loader.cpp")]
    with inside_backend("transformers", "listing the GGUF architectures it loads"):
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    reader = "transformers/modeling_gguf_pytorch_utils.py, load_gguf_checkpoint (from_pretrained(..., gguf_file=))"
    if base.architecture in GGUF_SUPPORTED_ARCHITECTURES:
        verdicts.append(Verdict("transformers", "yes", note=f"{what}, dequantized by gguf: {reader}"))
    else:
        verdicts.append(Verdict("transformers", "no", f"{reader} has no {base.architecture} architecture"))
    unserved = [t for t in types if t not in SERVED_GGUF_TYPES]
    for engine, source in ENGINE_GGUF.items():
        if unserved:
            verdicts.append(Verdict(engine, "no", f"{source} has no kernel for {', '.join(unserved)}"))
        else:
            verdicts.append(Verdict(engine, "yes", note=f"{what}: {source} (pass the original model's tokenizer)"))
    return verdicts

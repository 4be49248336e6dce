"""Merging ΔW into weights: the shared kernels (`kernels`), a base checkpoint on disk (`checkpoint`), a quantized
base in its own format (`quantized_base`), a diffusers pipeline folder (`diffusers_pipeline`) and a model loaded in
a Python session (`loaded_model`). The use case that writes a merged folder with its card is
`loramix.merging.merge_into_base`."""

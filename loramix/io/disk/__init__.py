"""Bytes on disk without torch: safetensors headers, copies in the kernel and locked temporary names (`rawcopy`),
and the CLI's copy of a base started before torch is imported (`early_copy`)."""

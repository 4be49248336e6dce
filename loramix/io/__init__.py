"""File plumbing: safe tensor files and atomic outputs (`files`), the one base-checkpoint reader and name-matching
rule (`base`), the one safetensors file writer (`tensorfile`) and the sharded checkpoint writer (`shards`), which
builds its headers there; bytes on disk without torch in `disk` (kernel copies, the CLI's early copy)."""

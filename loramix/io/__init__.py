"""File plumbing: safe tensor files and atomic outputs (`files`), the one base-checkpoint reader and name-matching
rule (`base`), and the sharded safetensors writer (`shards`)."""

"""Cross-model mappings: paired states, fits, the safetensors artefact and its registry."""

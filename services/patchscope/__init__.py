"""patchscope: decode a language model's hidden states by patching them into a target model's generation."""

__version__ = "0.1.0"

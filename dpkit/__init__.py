"""dpkit: fine-tune Hugging Face causal LMs with DeepSpeed ZeRO data parallelism."""

__version__ = "0.1.0"

"""vlmtune: fine-tune Qwen-VL models without ever splitting an image run."""

__version__ = "0.1.0"

"""mire-factory: LLaMA-Factory recipes and plugins for the WWW2025 MIRE challenge (Qwen2-VL)."""

__version__ = "0.1.0"

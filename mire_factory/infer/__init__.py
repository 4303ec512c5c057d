"""Inference on MIRE datasets in LLaMA-Factory's format: training-identical prompts, truncation, backends."""

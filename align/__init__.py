"""align: causal-LM fine-tuning, SFT and DPO as YAML recipes that share one runtime."""

__version__ = "0.1.0"

"""sft-cli: config-driven supervised fine-tuning of pretrained models."""

__version__ = "0.1.0"

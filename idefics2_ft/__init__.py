"""idefics2-ft: fine-tune Idefics2 with (Q)LoRA inside PyTorch Lightning."""

__version__ = "0.1.0"

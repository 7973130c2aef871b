"""vessel-distill: distil a large vessel-segmentation teacher into small, fast students."""

__version__ = "0.1.0"

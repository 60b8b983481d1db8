"""lsa_dist: distributed training of Locally Shifted Attention vision transformers."""

__version__ = "0.1.0"

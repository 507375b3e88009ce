"""hybridize: retrofit linear-time mixers onto pretrained transformer LLMs and distil them."""

__version__ = "0.1.0"

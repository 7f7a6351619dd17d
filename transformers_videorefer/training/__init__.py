"""Training VideoRefer: data in the upstream format, the paper's stages, LoRA, and the offline quickstart.

The modules import TRL, PEFT and `datasets` only when used: `pip install "transformers-videorefer[train]"`.
"""

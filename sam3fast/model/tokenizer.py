import os
DEFAULT_BPE_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "bpe_simple_vocab_16e6.txt.gz")

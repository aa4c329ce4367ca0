"""soda-tokenize: speech corpora -> interleaved semantic/acoustic/text token shards (webdataset)."""

__version__ = "0.1.0"

"""bnmem: the experiment suite measuring how BatchNorm amplifies memorization and privacy risk."""
__version__ = "0.1.0"

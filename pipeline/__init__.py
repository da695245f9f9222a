"""hdpipe: a cached-teacher pipeline for Hybrid Distillation of vision transformers.

`pipeline` holds the machinery (CLI, configs, manifests, data, stores, models); `stages` holds one
module per pipeline stage, each around one plain function.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hdpipe")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

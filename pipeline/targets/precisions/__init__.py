"""Store precisions, one module each (a `Codec` of `base.py`); the registry is `pipeline.targets.quant.CODECS`."""

"""Where work runs (not what it computes): in process or on dask workers, devices, prefetch threads."""

"""Teacher targets: frozen teachers, masks and target math, and the Zarr stores that hold them."""

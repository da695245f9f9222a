"""Samples: images -> deterministic tar shards + a manifest -> verified records and rendered views."""

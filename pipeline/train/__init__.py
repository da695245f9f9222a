"""Stage two: the loader joining tars with stores, the masked student, the hybrid loss and the loop."""

"""Teacher backends: one module per model family, each a `TeacherBackend` (see `protocol.py`)."""

"""One module per pipeline stage: its typed config and one plain function that orchestrates machinery."""

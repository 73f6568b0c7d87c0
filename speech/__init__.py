"""Speech features, Conformer encoder, BEST-RQ, speech data and metrics (see ARCHITECTURE.md). Built in a later issue."""

"""Frame sampling, temporal aggregator, video data and metrics (see docs/ARCHITECTURE.md). Built in a later issue."""

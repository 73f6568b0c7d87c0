"""Frame sampling, temporal aggregator, video data and metrics (see ARCHITECTURE.md). Built in a later issue."""

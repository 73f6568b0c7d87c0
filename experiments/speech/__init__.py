"""The speech experiments' YAMLs, and the speech recipes' LM copy stage."""

"""The herd command line, the recipes and the experiment YAMLs."""

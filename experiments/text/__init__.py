"""The text experiments' YAMLs, and the helpers the post-training recipes share."""

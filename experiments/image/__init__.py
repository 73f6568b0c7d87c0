"""The image experiments' YAMLs, and the helpers the image recipes share (model sections, data, grounding,
the LM-prior stage)."""

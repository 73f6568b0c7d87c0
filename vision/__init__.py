"""Image encoder, tiling, image data and VQA metrics (see ARCHITECTURE.md). Built in a later issue."""

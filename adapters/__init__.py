"""The multimodal composition around a frozen language model (see ARCHITECTURE.md). Built in a later issue."""

"""Interactive chat front ends."""

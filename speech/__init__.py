"""Speech: audio loading, log-mel features, the rotary Conformer encoder, BEST-RQ, speech data (espeak
synthesis, Asterisk prompts, manifests) and WER/BLEU metrics (see docs/ARCHITECTURE.md)."""

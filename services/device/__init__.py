"""The P/D-Device emulated device: shows the cloud's first token at once, paces the cloud's
tokens with a speed controller, then decodes locally."""

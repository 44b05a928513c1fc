"""Torch-free model facts: where a prepared model lives, its limits and fingerprint, its
tokenizer and chat template, and the latency profiles of the mock engine."""

"""Conversion of checkpoints to and from this package, and upload to the Hugging Face Hub."""

"""Model weights shipped with the package (the tiny model, in Hugging Face's format)."""

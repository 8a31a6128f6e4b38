"""Hugging Face transformers: attention heads and FFN neurons as prunable units, compaction, saved folders."""

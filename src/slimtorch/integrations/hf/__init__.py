"""Hugging Face transformers: attention heads and FFN neurons as prunable units, their compaction, saved folders.

Importing this package registers the channel rules and shrink functions of Hugging Face attention
(:mod:`~slimtorch.integrations.hf.rules`) and the update of a compacted model's config
(:mod:`~slimtorch.integrations.hf.compaction`); :mod:`slimtorch.integrations` does so the first time a model
is traced once ``transformers`` is loaded.

- ``units``: which parameter slices make up a head or an FFN neuron in BERT, GPT-2, LLaMA and ViT blocks
- ``rules``: the module rules and shrink functions for their attention
- ``compaction``: ``compact_hf_``, ``unit_masks``, the config and pruned-head records
- ``folders``: ``save_hf_folder`` / ``load_hf_folder`` of Hugging Face folders
"""

from slimtorch.integrations.hf import compaction, rules  # noqa: F401  (register the rules and the config update)

"""Hugging Face transformers: attention heads, FFN neurons and experts as prunable units, their compaction, saved
folders.

Importing this package registers the channel rules and shrink functions of Hugging Face attention
(:mod:`~slimtorch.integrations.hf.rules`) and mixtures of experts (:mod:`~slimtorch.integrations.hf.moe`), and the
update of a compacted model's config (:mod:`~slimtorch.integrations.hf.compaction`); :mod:`slimtorch.integrations`
does so the first time a model is traced once ``transformers`` is loaded.

- ``layouts``: where the heads of each attention layout live (fused, interleaved, grouped, shared)
- ``units``: which parameter slices make up a head, an FFN neuron or an expert's neuron
- ``rules``: the module rules and shrink functions for attention
- ``moe``: routers and experts; removing whole experts; the neurons of each expert
- ``configs``: the config a compacted model records
- ``compaction``: ``compact_hf_``, ``unit_masks``, the pruned-head records
- ``folders``: ``save_hf_folder`` / ``load_hf_folder`` of Hugging Face folders
"""

from slimtorch.integrations.hf import compaction, moe, rules  # noqa: F401  (register the rules and the config update)

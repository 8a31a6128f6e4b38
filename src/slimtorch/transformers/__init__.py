"""Transformers: Hugging Face head and FFN compaction, the MiniLM workflow, one-shot LM pruning.

Submodules (import them directly; this package imports nothing heavy by itself):

- ``text``: offline English text (Wikipedia articles and news stories shipped in the gensim wheel)
- ``llm``: a small LLaMA-style causal LM with grouped-query attention, trained here; perplexity
- ``sparsegpt``, ``oneshot``: SparseGPT, Wanda and magnitude one-shot pruning of a causal LM
- ``blocks``, ``hf``, ``pretrained``: heads and FFN neurons of BERT, GPT-2, LLaMA and ViT blocks,
  ``compact_hf_``, ``save_compacted`` / ``load_compacted``
- ``minilm``, ``workflow``: all-MiniLM-L6-v2 offline, embedding agreement, heads-then-FFN pruning with
  distillation
"""

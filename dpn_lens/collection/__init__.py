"""The statistics stage: prompts through the model into per-neuron running statistics.

``collect`` (batched forward passes with hooks on ``mlp.hook_post``), ``prefix`` (shared prompt prefixes run
once into a KV cache), ``distributed`` (the same over processes), ``statistics`` (running count, mean and M2,
mergeable) and ``answer_statistics`` (statistics read at the model's own answer tokens).
"""

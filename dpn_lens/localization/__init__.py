"""The localization stage: statistics into neuron maps.

``localize`` (s, Cohen's d, the dual criterion and the effect rules' entry point), ``settings`` (q, tau_d and
the layer range, from the paper or proposed from the data) and ``neuron_map`` (the saved, checked artifact).
"""

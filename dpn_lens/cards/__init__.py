"""Neuron cards: what each selected neuron reads, writes and does, and two ways to browse them.

Along the data flow: ``lens`` (what a neuron writes: the logit lens of its output direction),
``contexts`` (what it reads: top-activating contexts, streamed with a bounded top-k), ``card`` (one card
per neuron of a run's maps, cached in ``RUN/cards/``), ``explorer`` + ``page`` (the offline HTML
explorer, ``dpn-lens explore --run RUN``) and ``notebook`` (the ipywidgets panel, ``dl.explore(run, model)``).
"""

from dpn_lens.cards.card import CardConfig, Context, NeuronCard, build_cards, cards_path, load_cards
from dpn_lens.cards.contexts import TopContexts, scan, text_windows
from dpn_lens.cards.explorer import write_explorer
from dpn_lens.cards.lens import LogitLens, logit_lens
from dpn_lens.cards.notebook import card_html, explore, selection_view, steered_answers

__all__ = ["CardConfig", "Context", "NeuronCard", "build_cards", "cards_path", "load_cards", "TopContexts", "scan",
           "text_windows", "write_explorer", "LogitLens", "logit_lens", "card_html", "explore", "selection_view",
           "steered_answers"]

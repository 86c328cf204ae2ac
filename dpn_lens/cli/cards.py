"""``dpn-lens cards --run RUN`` (a card for every neuron of every map of a run folder, saved in
``RUN/cards/``) and ``dpn-lens explore --run RUN`` (the cards, built where missing, as an offline HTML
explorer).

Example:
    $ dpn-lens cards --run runs/demo --data-dir ../shared/data
    $ dpn-lens cards --run runs/rules --rules attribution-t --text-windows 256
    $ dpn-lens explore --run runs/demo --data-dir ../shared/data   # then open runs/demo/explorer/index.html
"""

from __future__ import annotations

import argparse

from dpn_lens.cli.options import (CommaList, add_data_dir_option, add_model_options, add_positional_run, add_renamed,
                                  add_subcommand)

__all__ = ["register", "run_cards", "run_explore"]


def _card_options(parser: argparse.ArgumentParser) -> None:
    from dpn_lens.cards.card import CardConfig

    defaults = CardConfig()
    add_positional_run(parser, "run folder (written by `dpn-lens demo` or `dpn-lens locate --out`)")
    add_model_options(parser, default=None, model_help="model the maps were located on (None: the run's summary.json)")
    add_data_dir_option(parser, "capability/wikitext2_test (the neutral text; without it cards have no neutral "
                                "contexts)")
    parser.add_argument("--rules", action=CommaList, default=None,
                        help="comma list of the maps to card: dpn-le and effect rules (None: every map of the run)")
    parser.add_argument("--n-pairs", type=int, default=defaults.n_pairs,
                        help="embedded contrastive pairs per trait for the histogram and the prompt contexts")
    parser.add_argument("--text-windows", type=int, default=defaults.text_windows,
                        help="WikiText-2 windows streamed for the neutral contexts")
    parser.add_argument("--k", type=int, default=defaults.k, help="top contexts kept per neuron and source")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--effects", type=int, default=0,
                        help="neurons per map whose trait-margin shift alone is measured (needs personalitybench/ "
                             "in --data-dir; one scoring pass each; 0: none)")
    parser.add_argument("--eval-pairs", type=int, default=32, help="held-out preference pairs for --effects")
    add_renamed(parser, "--effect-pairs", "--eval-pairs", type=int)


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``cards`` and ``explore`` to the ``dpn-lens`` subcommands."""
    cards = add_subcommand(commands, "cards", "neuron cards: what each neuron of a run's maps reads and writes "
                                              "(RUN/cards/)")
    _card_options(cards)
    cards.set_defaults(handler=run_cards)
    explore = add_subcommand(commands, "explore", "an offline HTML explorer of a run's maps and neuron cards "
                                                  "(RUN/explorer/index.html)")
    _card_options(explore)
    explore.add_argument("--out", default=None, help="folder for the explorer (None: RUN/explorer)")
    explore.set_defaults(handler=run_explore)


def _build(args: argparse.Namespace):
    from dpn_lens.cards.card import CardConfig, build_cards
    from dpn_lens.models import load_model
    from dpn_lens.run import Run

    config = CardConfig(n_pairs=args.n_pairs, data_dir=args.data_dir, text_windows=args.text_windows, k=args.k,
                        batch_size=args.batch_size)
    run = Run.load(args.run)
    rules = args.rules
    model_name = args.model or run.model_name
    if not model_name:
        raise ValueError(f"{args.run}/summary.json names no model; pass --model (the model the maps were located on)")
    model = load_model(model_name, dtype=args.dtype, device=args.device)
    cards = build_cards(run, model, config, rules=rules)
    if args.effects:
        from dpn_lens.cards.card import save_run_cards
        from dpn_lens.cards.effects import add_effects

        add_effects(run, model, cards, args.data_dir, top=args.effects, n_pairs=args.eval_pairs)
        save_run_cards(run, cards, config)
    return run, cards


def run_cards(args: argparse.Namespace) -> int:
    """Handler of ``dpn-lens cards``."""
    from dpn_lens.cards.card import CARDS_DIR

    _, cards = _build(args)
    for (rule, trait), trait_cards in cards.items():
        top = trait_cards[0] if trait_cards else None
        first = "" if top is None else (f"; e.g. {top.label} ({top.pole}) promotes "
                                        + ", ".join(repr(token) for token, _ in top.promoted[:5]))
        print(f"{trait} [{rule}]: {len(trait_cards)} cards{first}")
    print(f"wrote {args.run}/{CARDS_DIR}/")
    return 0


def run_explore(args: argparse.Namespace) -> int:
    """Handler of ``dpn-lens explore``."""
    from dpn_lens.cards.explorer import write_explorer

    run, cards = _build(args)
    folder = write_explorer(run, cards, args.out)
    print(f"explorer: {sum(len(c) for c in cards.values())} cards of {len(cards)} maps; open {folder / 'index.html'}")
    return 0

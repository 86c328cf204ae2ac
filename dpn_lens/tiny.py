"""A tiny random Llama for examples, smoke runs and tests (no download, builds in about a second).

The model is a 4-layer ``LlamaForCausalLM`` with random weights and a word-level tokenizer over a
small English vocabulary, booted as a TransformerLens ``TransformerBridge`` exactly like
``load_model`` boots a real model. Its activations mean nothing; it exists so that code paths
(collection, localization, steering, the benchmark script) can run end to end in seconds on a CPU.
Words outside the vocabulary become ``<unk>``.

Example:
    >>> from dpn_lens.tiny import build_tiny_model
    >>> model = build_tiny_model()
    >>> (model.cfg.n_layers, model.cfg.d_mlp)
    (4, 48)
    >>> model.tokenizer("you are kind .")["input_ids"]
    [1, 4, 5, 23, 51]
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["TINY_WORDS", "TINY_PUNCTUATION", "build_tiny_tokenizer", "build_tiny_hf_model", "build_tiny_model"]

TINY_WORDS: tuple[str, ...] = tuple((
    "you are a person who loves new ideas art and travel prefers routine quiet calm anxious worried "
    "outgoing reserved kind blunt organised careless what would do on the weekend friend invites "
    "party book plan money work home how feel about it yes no i the to of and in"
).split())

TINY_PUNCTUATION: tuple[str, ...] = (".", ",", "?", "!", "#", ":")


def _folder(folder: str | Path | None) -> Path:
    # The bridge needs a `from_pretrained` tokenizer, so the tokenizer is saved and reloaded from disk.
    return Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="dpn_lens_tiny_"))


def build_tiny_tokenizer(folder: str | Path | None = None, words: Sequence[str] = TINY_WORDS,
                         punctuation: Sequence[str] = TINY_PUNCTUATION):
    """A word-level fast tokenizer over ``words`` and ``punctuation``, saved in ``folder`` and reloaded.

    Ids 0-3 are ``<pad>``, ``<s>`` (BOS), ``</s>`` and ``<unk>``; the words follow in order (a repeated
    word keeps its first id). The tokenizer itself adds no BOS; booted in a bridge (``build_tiny_model``)
    it does, like a real model's. ``folder=None`` uses a fresh temporary folder.

    Example:
        >>> tokenizer = build_tiny_tokenizer(words=["hello", "world"], punctuation=["!"])
        >>> tokenizer("hello world !")["input_ids"]
        [4, 5, 6]
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = _folder(folder)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in [*words, *punctuation]:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def build_tiny_hf_model(folder: str | Path | None = None, seed: int = 0, n_layers: int = 4, d_mlp: int = 48,
                        max_positions: int = 128, words: Sequence[str] = TINY_WORDS,
                        punctuation: Sequence[str] = TINY_PUNCTUATION):
    """``(LlamaForCausalLM, tokenizer)``: a random tiny Llama (d_model 32) and its word-level tokenizer.

    The same ``seed`` and sizes give the same weights, so two calls build two copies of one model.

    Example:
        >>> hf_model, tokenizer = build_tiny_hf_model(n_layers=2)
        >>> (hf_model.config.num_hidden_layers, hf_model.config.intermediate_size, len(tokenizer))
        (2, 48, 57)
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer(folder, words, punctuation)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=d_mlp,
                         num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf_model = LlamaForCausalLM(config).eval()
    hf_model.config.architectures = ["LlamaForCausalLM"]
    return hf_model, tokenizer


def build_tiny_model(folder: str | Path | None = None, seed: int = 0, n_layers: int = 4, d_mlp: int = 48,
                     name: str = "tiny-llama", **hf_options):
    """A random tiny Llama booted as a ``TransformerBridge`` (a base model: prompts are used raw).

    ``hf_options`` (``max_positions``, ``words``, ``punctuation``) go to ``build_tiny_hf_model``.
    Like ``load_model``, it sets ``model.dpn_is_chat_model`` (False) and ``model.dpn_model_name``.

    Example:
        >>> model = build_tiny_model(d_mlp=16, name="toy")
        >>> (model.cfg.d_mlp, model.dpn_model_name, model.dpn_is_chat_model)
        (16, 'toy', False)
    """
    from transformer_lens.model_bridge import TransformerBridge

    hf_model, tokenizer = build_tiny_hf_model(folder, seed, n_layers, d_mlp, **hf_options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer)
    bridge.dpn_is_chat_model = False
    bridge.dpn_model_name = name
    return bridge

"""Shared fixtures: a tiny random Llama (unit tests) and the embedded SmolLM2 (slow, end to end)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DPN_LENS_DATA", REPO.parent / "shared" / "data"))

TINY_WORDS = (
    "you are a person who loves new ideas art and travel prefers routine quiet calm anxious worried "
    "outgoing reserved kind blunt organised careless what would do on the weekend friend invites "
    "party book plan money work home how feel about it yes no i the to of and in"
).split()


TINY_PUNCTUATION = (".", ",", "?", "!", "#", ":")


def build_tiny_tokenizer(folder: Path, words: Sequence[str] = TINY_WORDS,
                         punctuation: Sequence[str] = TINY_PUNCTUATION):
    """A word-level tokenizer, saved and reloaded (the bridge needs a `from_pretrained` tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in [*words, *punctuation]:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def build_tiny_hf_model(folder: Path, seed: int = 0, n_layers: int = 4, d_mlp: int = 48, max_positions: int = 128,
                        words: Sequence[str] = TINY_WORDS, punctuation: Sequence[str] = TINY_PUNCTUATION):
    """``(LlamaForCausalLM, tokenizer)``: a random tiny Llama and its word-level tokenizer (saved in ``folder``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer(folder, words, punctuation)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=d_mlp,
                         num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf_model = LlamaForCausalLM(config).eval()
    hf_model.config.architectures = ["LlamaForCausalLM"]
    return hf_model, tokenizer


def build_tiny_model(folder: Path, seed: int = 0, n_layers: int = 4, d_mlp: int = 48, name: str = "tiny-llama",
                     **hf_options):
    """A random tiny Llama booted as a TransformerBridge (a base model: raw prompts).

    ``hf_options`` (max_positions, words, punctuation) go to ``build_tiny_hf_model``.
    """
    from transformer_lens.model_bridge import TransformerBridge

    hf_model, tokenizer = build_tiny_hf_model(folder, seed, n_layers, d_mlp, **hf_options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer)
    bridge.dpn_is_chat_model = False
    bridge.dpn_model_name = name
    return bridge


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def other_tiny_model(tmp_path_factory):
    """Same architecture and sizes, different random weights."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_other"), seed=1)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct (slow tests only)."""
    from dpn_lens import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"the shared data folder {SHARED_DATA} is missing; set DPN_LENS_DATA to it")
    return SHARED_DATA


TINY_HIGH = [
    "you are outgoing and kind . what would you do on the weekend ?",
    "you are a person who loves new ideas . how would you feel about a party ?",
    "you are outgoing . a friend invites you to a party . what would you do ?",
    "you are kind and calm . how do you plan money ?",
    "you are outgoing and loves travel . what would you do at home ?",
    "you are a person who loves art . how would you feel about work ?",
]
TINY_LOW = [
    "you are reserved and quiet . what would you do on the weekend ?",
    "you are a person who prefers routine . how would you feel about a party ?",
    "you are reserved . a friend invites you to a party . what would you do ?",
    "you are anxious and worried . how do you plan money ?",
    "you are quiet and prefers home . what would you do at home ?",
    "you are blunt and careless . how would you feel about work ?",
]


@pytest.fixture
def tiny_pairs():
    from dpn_lens import ContrastiveSet

    return ContrastiveSet("extraversion", TINY_HIGH, TINY_LOW, source="tests")

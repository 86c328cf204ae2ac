"""Docstring examples either run or are not counted as tests (conftest.py's collection hook)."""

from __future__ import annotations

import doctest

from helpers import has_runnable_example


def docstring_test(text: str) -> doctest.DocTest:
    return doctest.DocTestParser().get_doctest(text, {}, "example", None, 0)


def test_a_docstring_whose_examples_are_all_skipped_is_not_a_test():
    text = """
    >>> model = load_model("smollm2-135m-instruct")     # doctest: +SKIP
    >>> model.cfg.n_layers                              # doctest: +SKIP
    30
    """
    assert not has_runnable_example(docstring_test(text))


def test_one_runnable_example_makes_the_docstring_a_test():
    text = """
    >>> model = load_model("smollm2-135m-instruct")     # doctest: +SKIP
    >>> 1 + 1
    2
    """
    assert has_runnable_example(docstring_test(text))


def test_a_docstring_without_examples_has_nothing_to_run():
    assert not has_runnable_example(docstring_test("Just prose."))

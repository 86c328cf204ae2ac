"""Evaluation: trait control without a judge (``trait``), capability preservation (``capability``) and
the method comparison (``compare``, command ``dpn-lens compare``)."""

from dpn_lens.evaluation.capability import CapabilitySizes, evaluate_capability, load_capability_suite
from dpn_lens.evaluation.compare import CompareConfig, run_comparison, write_outputs
from dpn_lens.evaluation.trait import load_ipip_items, questionnaire_scores, statement_agreement

__all__ = ["CapabilitySizes", "evaluate_capability", "load_capability_suite", "CompareConfig", "run_comparison",
           "write_outputs", "load_ipip_items", "questionnaire_scores", "statement_agreement"]

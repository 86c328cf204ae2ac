"""Evaluation: does steering work (``control``, command ``dpn-lens control``: preference shift with
intervals, persona positive control, random-neuron control, matched-cost comparison, ``calibrate``),
questionnaire and statement scores (``trait``), capability preservation (``capability``) and the
questionnaire/capability comparison (``compare``, command ``dpn-lens compare``; its result is a
``ComparisonRecord``, ``comparison_record``)."""

from dpn_lens.evaluation.capability import CapabilitySizes, evaluate_capability, load_capability_suite
from dpn_lens.evaluation.compare import CompareConfig, run_comparison, write_outputs
from dpn_lens.evaluation.comparison_record import ComparisonRecord, load_comparison_record
from dpn_lens.evaluation.control import ControlConfig, run_control
from dpn_lens.evaluation.control_record import ControlRecord, load_control_record
from dpn_lens.report.control import write_control_outputs
from dpn_lens.evaluation.trait import load_ipip_items, questionnaire_scores, statement_agreement

__all__ = ["CapabilitySizes", "evaluate_capability", "load_capability_suite", "CompareConfig", "run_comparison",
           "write_outputs", "ComparisonRecord", "load_comparison_record", "load_ipip_items", "questionnaire_scores",
           "statement_agreement", "ControlConfig", "run_control", "write_control_outputs", "ControlRecord",
           "load_control_record"]

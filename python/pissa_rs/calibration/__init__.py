"""Calibration text through the model one decoder layer at a time: the per-target
statistics that data-aware methods (CorDA, EVA) decompose with."""

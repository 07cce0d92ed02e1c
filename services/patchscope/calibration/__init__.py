"""Calibrators: the probability that an explanation's answer is right, from its faithfulness signals."""

"""Baselines fastsfm compares against (real-image selections, linear gradient matching)."""

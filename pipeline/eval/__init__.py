"""Evaluation and analysis of students and teachers: probes, attention and spectrum properties, plots."""

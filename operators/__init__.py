"""Candidate language and variation operators."""

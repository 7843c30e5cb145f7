"""PEFT's own custom-model tests, run with SALT's rows (see conftest.py)."""

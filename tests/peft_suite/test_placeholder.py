"""Collected only when PEFT's tests could not be prepared (conftest.py): says why."""

import pytest

from . import conftest


def test_peft_custom_model_suite_is_available():
    if conftest._problem is None:
        return
    if "peft is not installed" in conftest._problem:
        pytest.skip(conftest._problem)
    pytest.fail(f"{conftest._problem}. Point SALT_PEFT_TESTS at the tests/ directory of the installed PEFT's "
                "source, or run pytest with --ignore=tests/peft_suite", pytrace=False)

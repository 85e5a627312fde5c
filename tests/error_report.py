"""The largest error each comparison of a test module saw, printed when the module ends (pytest -s
shows it): the figures the closing notes quote against torch."""
from collections import defaultdict

import pytest


def worst_errors(title):
    """(errors, fixture): record with note(errors, key, err); bind the fixture to a module-level name."""
    errors = defaultdict(float)

    @pytest.fixture(scope='module', autouse=True)
    def report_worst():
        yield
        if errors:
            print(f'\n{title}: ' + ', '.join(f'{k} {e:.2e}' for k, e in sorted(errors.items())))
    return errors, report_worst


def note(errors, key, err):
    errors[key] = max(errors[key], err)

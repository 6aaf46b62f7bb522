"""The misuse table's harness: one row per thing a user can get wrong, and what tfopt must say.

Each area of tfopt keeps its rows in `tests/misuse/test_<area>.py` as a list of
`Misuse`, run by `MisuseTestCase.run_table`. A row names the misuse (the same
words as its line in `docs/errors.md`, which `test_docs.py` checks), does it,
and says how tfopt must answer: an exception, a warning or a log record whose
message matches `match` (the layer or argument, the value received and the fix:
CONTRIBUTING.md's rule for messages).

To add a case: append one row to the table of its area, and its line to
`docs/errors.md`.
"""

import dataclasses
import logging
import warnings

from tfopt import testing


@dataclasses.dataclass
class Misuse:
    """One misuse and the answer tfopt must give.

    Attributes:
        name: what the user does, as listed in `docs/errors.md`.
        action: a callable doing it.
        raises: the exception type expected (or None).
        warns: the warning category expected (or None).
        logs: the logger name expected to log a WARNING or above (or None).
        match: a regex the message must match.
    """

    name: str
    action: object
    raises: type = None
    warns: type = None
    logs: str = None
    match: str = ""


class MisuseTestCase(testing.TestCase):
    def check(self, row):
        if row.raises is not None:
            with self.assertRaisesRegex(row.raises, row.match, msg=row.name):
                row.action()
        elif row.warns is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                with self.assertWarnsRegex(row.warns, row.match, msg=row.name):
                    row.action()
        elif row.logs is not None:
            with self.assertLogs(row.logs, level=logging.WARNING) as logged:
                row.action()
            self.assertRegex("\n".join(logged.output), row.match, msg=row.name)
        else:
            raise AssertionError(f"misuse row {row.name!r} expects nothing")

    def run_table(self, table):
        names = [row.name for row in table]
        self.assertEqual(len(names), len(set(names)), "misuse names must be unique")
        checked = 0
        for row in table:
            with self.subTest(row.name):
                self.check(row)
                checked += 1
        return checked


def all_rows():
    """Every row of every table (for the docs check)."""
    import importlib
    import pkgutil

    import tests.misuse as package

    rows = []
    for module in pkgutil.iter_modules(package.__path__):
        if module.name.startswith("test_") and module.name != "test_docs":
            rows += getattr(importlib.import_module(f"tests.misuse.{module.name}"), "TABLE", [])
    return rows

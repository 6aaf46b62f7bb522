"""Every misuse in the tables has its line in docs/errors.md, so users can search a message."""

import os

from tests.misuse.harness import MisuseTestCase, all_rows

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "errors.md")


class ErrorsDocTest(MisuseTestCase):
    def test_every_row_is_documented(self):
        with open(DOC) as f:
            text = f.read()
        missing = [row.name for row in all_rows() if row.name not in text]
        self.assertEqual(missing, [])

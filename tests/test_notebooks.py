"""The notebooks in notebooks/ execute top to bottom on CPU (small sizes), outputs stripped in git."""

import glob
import json
import os
import tempfile

import pytest

from tfopt import testing

_NOTEBOOKS = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                           "notebooks", "*.ipynb")))


@pytest.mark.slow
class NotebooksTest(testing.TestCase):
    def test_there_are_notebooks_and_their_outputs_are_stripped(self):
        self.assertEqual([os.path.basename(p) for p in _NOTEBOOKS],
                         ["colab_tpu.ipynb", "distillation.ipynb", "quickstart.ipynb"])
        for path in _NOTEBOOKS:
            with open(path) as f:
                cells = json.load(f)["cells"]
            for cell in cells:
                self.assertFalse(cell.get("outputs"), f"{path}: outputs not stripped")

    def test_notebooks_execute(self):
        import nbclient
        import nbformat

        # A line each notebook prints only when its last steps ran.
        expected = {"colab_tpu.ipynb": "float ops left: none", "quickstart.ipynb": "top-1 agreement",
                    "distillation.ipynb": "online-distilled small CNN:"}
        for path in _NOTEBOOKS:
            notebook = nbformat.read(path, as_version=4)
            client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                             resources={"metadata": {"path": tempfile.mkdtemp()}})
            client.execute()  # raises CellExecutionError naming the failing cell
            code = [cell for cell in notebook.cells if cell.cell_type == "code"]
            self.assertTrue(all(cell.execution_count for cell in code), f"{path}: a cell did not run")
            outputs = [o for cell in code for o in cell.get("outputs", [])]
            self.assertFalse([o for o in outputs if o.get("output_type") == "error"], path)
            text = "".join(o.get("text", "") for o in outputs)
            self.assertIn(expected[os.path.basename(path)], text, path)

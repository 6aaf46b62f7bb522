"""The notebooks in notebooks/ execute top to bottom on CPU (small sizes), outputs stripped in git."""

import glob
import json
import os
import tempfile

import pytest
from absl.testing import parameterized

from tfopt import testing

_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
_NOTEBOOKS = sorted(glob.glob(os.path.join(_DIR, "*.ipynb")))
# A line each notebook prints only when its last steps ran.
_EXPECTED = {"colab_tpu.ipynb": "float ops left: none", "colab_tpu_jax.ipynb": "float ops left: none",
             "quickstart.ipynb": "top-1 agreement",
             "distillation.ipynb": "online-distilled small CNN:", "large_models.ipynb": "loaded, same outputs: True"}


@pytest.mark.slow
class NotebooksTest(testing.TestCase, parameterized.TestCase):
    def test_there_are_notebooks_and_their_outputs_are_stripped(self):
        self.assertEqual([os.path.basename(p) for p in _NOTEBOOKS], sorted(_EXPECTED))
        for path in _NOTEBOOKS:
            with open(path) as f:
                cells = json.load(f)["cells"]
            for cell in cells:
                self.assertFalse(cell.get("outputs"), f"{path}: outputs not stripped")

    # One test per notebook, so that pytest-xdist runs them on different workers.
    @parameterized.named_parameters([(name.split(".")[0], name) for name in sorted(_EXPECTED)])
    def test_notebook_executes(self, name):
        import nbclient
        import nbformat

        path = os.path.join(_DIR, name)
        notebook = nbformat.read(path, as_version=4)
        client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                         resources={"metadata": {"path": tempfile.mkdtemp()}})
        client.execute()  # raises CellExecutionError naming the failing cell
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        self.assertTrue(all(cell.execution_count for cell in code), f"{path}: a cell did not run")
        outputs = [o for cell in code for o in cell.get("outputs", [])]
        self.assertFalse([o for o in outputs if o.get("output_type") == "error"], path)
        text = "".join(o.get("text", "") for o in outputs)
        self.assertIn(_EXPECTED[name], text, path)

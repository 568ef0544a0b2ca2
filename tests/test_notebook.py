"""The notebook view: a real Jupyter kernel (nbclient) runs a scoring cell and a
CamModel.show cell; the report renders as HTML (ranking + scatter), the figure as a PNG."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent

CELLS = [
    # The kernel runs in REPO (resources below), which `python -m ipykernel_launcher` puts
    # first on sys.path: the checkout's sp2ps_onnx is the one imported.
    "import numpy as np\n"
    "from sp2ps_onnx import CamModel\n"
    "from sp2ps_onnx.scoring import DataOptions, MetricOptions, RunOptions, score_models",
    "report = score_models('models/fmnist_cnn.onnx', ['models/pruned/fmnist_cnn_mag80.onnx',\n"
    "                      'models/pruned/fmnist_cnn_mag95.onnx'],\n"
    "                      'models/samples/fmnist_test.npz',\n"
    "                      data_options=DataOptions(preset='unit', limit=24),\n"
    "                      metric=MetricOptions(n_bootstrap=20), run=RunOptions(progress=True))\n"
    "report",
    "model = CamModel('models/fmnist_cnn.onnx')\n"
    "x = np.load('models/samples/fmnist_test.npz')['x'][:1, None].astype(np.float32) / 255\n"
    "model.show(x[0], method='gradcam', cmap='turbo')",
]


def test_notebook_shows_the_report_and_a_cam_figure() -> None:
    nbformat = pytest.importorskip("nbformat")  # test dependencies; never skipped in CI
    nbclient = pytest.importorskip("nbclient")
    import imageio.v3 as iio

    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(REPO)}})
    client.execute()
    report_cell, figure_cell = notebook.cells[1], notebook.cells[2]
    (result,) = [o for o in report_cell.outputs if o.output_type == "execute_result"]
    html = result.data["text/html"]
    assert html.count("<svg") == 1 and "<table" in html
    assert html.index("fmnist_cnn_mag80") < html.index("fmnist_cnn_mag95")  # ranked
    assert any(o.output_type == "stream" and o.name == "stderr" and "score" in o.text
               for o in report_cell.outputs)  # the tqdm bar
    (figure,) = [o for o in figure_cell.outputs if o.output_type == "execute_result"]
    png = iio.imread(base64.b64decode(figure.data["image/png"]))
    assert png.ndim == 3 and png.shape[1] > png.shape[0] > 100
    assert np.ptp(png[..., :3]) > 100  # a drawn figure, not a blank canvas


def test_show_draws_input_cam_and_overlay_of_the_models_cam() -> None:
    from sp2ps_onnx import CamModel, InputDataError
    from sp2ps_onnx.figures import overlay

    model = CamModel(str(REPO / "models" / "fmnist_cnn.onnx"))
    image = np.load(REPO / "models" / "samples" / "fmnist_test.npz")["x"][3]
    x = (image[None].astype(np.float32) / 255)
    maps, targets = model.cams(x[None], method="layercam", targets=[2])
    figure = model.show(x, method="layercam", target=2, image=image, cmap="viridis")
    panels = [axis.images[0].get_array() for axis in figure.axes if axis.images]
    np.testing.assert_array_equal(panels[0], np.repeat(image[..., None], 3, axis=2))
    np.testing.assert_allclose(panels[1], maps[0], atol=1e-6)
    np.testing.assert_array_equal(panels[2], overlay(image, maps[0], cmap="viridis"))
    assert "class 2" in figure.get_suptitle() and targets[0] == 2
    with pytest.raises(InputDataError, match="one sample"):
        model.show(np.repeat(x[None], 2, axis=0))

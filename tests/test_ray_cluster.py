"""Two Ray nodes simulated on one machine (ray.cluster_utils.Cluster): the driver joins by
address, actors run on both nodes and the numbers equal a local run's."""

from __future__ import annotations

from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed")

from sp2ps_onnx.scoring import RayOptions, score_models  # noqa: E402
from tests.test_ray import DATA, KWARGS, ORIGINAL, PRUNED, assert_same, options  # noqa: E402


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_two_node_cluster_gives_the_numbers_of_a_local_run(two_nodes, tmp_path: Path) -> None:
    local = score_models(ORIGINAL, PRUNED, DATA, **KWARGS)
    remote = score_models(ORIGINAL, PRUNED, DATA, **options(
        ray=RayOptions(address=two_nodes.address, workers=2)))
    assert len(ray.nodes()) == 2 and all(node["Alive"] for node in ray.nodes())
    assert_same(local, remote)

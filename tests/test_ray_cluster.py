"""Three Ray nodes simulated on one machine (ray.cluster_utils.Cluster): the driver joins by
address, actors run on several nodes and the numbers equal a local run's, also when a node
dies mid-run."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed")

from sp2ps_onnx.scoring import RayOptions, score_models  # noqa: E402
from tests.test_ray import DATA, KWARGS, ORIGINAL, PRUNED, assert_same, options  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def local_report():
    return score_models(ORIGINAL, PRUNED, DATA, **KWARGS)


def test_a_cluster_gives_the_numbers_of_a_local_run(cluster, local_report) -> None:
    simulated, _ = cluster
    remote = score_models(ORIGINAL, PRUNED, DATA, **options(
        ray=RayOptions(address=simulated.address, workers=2)))
    assert len(ray.nodes()) == 3 and all(node["Alive"] for node in ray.nodes())
    assert_same(local_report, remote)


def test_a_node_killed_mid_run_loses_and_duplicates_no_row(cluster, local_report) -> None:
    """A worker node with a scoring actor dies after the first batch: Ray restarts the actor
    on a node that is left and retries its batches; every row arrives exactly once."""
    simulated, workers = cluster
    killed: list[str] = []

    def kill_a_node(done: int, total: int) -> None:
        if killed:
            return
        by_id = {node.node_id: node for node in workers}
        for actor in ray._private.state.actors().values():
            node_id = actor.get("Address", {}).get("NodeID") or actor.get("NodeID")
            if ("ScoreWorker" in actor["ActorClassName"] and actor["State"] == "ALIVE"
                    and node_id in by_id):
                simulated.remove_node(by_id[node_id], allow_graceful=False)
                killed.append(node_id)
                return

    remote = score_models(ORIGINAL, PRUNED, DATA, **options(
        ray=RayOptions(address=simulated.address, workers=2), progress=kill_a_node))
    assert killed, "no worker node held a scoring actor"
    alive = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    assert killed[0] not in alive and len(alive) == 2
    assert_same(local_report, remote)  # aggregate() refuses lost or duplicated rows

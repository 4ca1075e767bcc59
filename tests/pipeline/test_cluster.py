"""The resource check: each role's bundles against fake node lists, and once against real Ray."""

from __future__ import annotations

import pytest

from pipeline.cluster import ClusterError, check_resources, gpu_rollout_check, role_demands
from pipeline.config import ConfigError, load_config

# Node records shaped like `ray.nodes()` entries (only the fields the check reads).
HEAD = {"Alive": True, "Resources": {"CPU": 8.0, "memory": 3e10}}  # CPU-only: runs the driver
GPU_NODE = {"Alive": True, "Resources": {"CPU": 96.0, "GPU": 8.0, "memory": 1e12}}


def _cfg(*overrides: str):
    """The defaults (kl_coef 0.04, so the reference role is on) plus GPU placement keys."""
    return load_config(None, ["trainer.eval_samples=64", "trainer.prompts_per_step=16",
                              *overrides])


def _one_node_of_8(*extra: str):
    # 4 policy + 2 rollout + 1 reference = 7 GPUs; 4 + 2 + 1 + 4 reward = 11 CPUs.
    return _cfg("policy.num_ranks=4", "policy.gpus_per_rank=1", "rollout.num_engines=2",
                "rollout.gpus_per_engine=1", "reference.gpus_per_rank=1",
                "reward.num_workers=4", "cluster.num_nodes=1", *extra)


def test_role_demands_lists_each_role_and_drops_reference_without_kl():
    cfg = _cfg("rollout.num_engines=2", "rollout.tensor_parallel_size=4",
               "rollout.gpus_per_engine=4", "reward.cpus_per_worker=0.5")
    demands = {d.name: (d.count, d.cpus, d.gpus) for d in role_demands(cfg)}
    assert demands == {"policy": (1, 1, 0), "rollout": (2, 1, 4),  # one bundle per engine
                       "reference": (1, 1, 0), "reward": (1, 0.5, 0)}
    names = [d.name for d in role_demands(_cfg("algo.kl_coef=0"))]
    assert names == ["policy", "rollout", "reward"]


def test_enough_resources_pass():
    check_resources(_one_node_of_8(), [HEAD, GPU_NODE])
    check_resources(_one_node_of_8(), [GPU_NODE])  # the driver may share the GPU node


def test_too_few_gpus_names_the_count_and_each_role():
    cfg = _cfg("policy.num_ranks=8", "policy.gpus_per_rank=1", "rollout.num_engines=2",
               "rollout.tensor_parallel_size=4", "rollout.gpus_per_engine=4")
    with pytest.raises(ClusterError) as err:
        check_resources(cfg, [HEAD, GPU_NODE])
    # 8 x 1 + 2 x 4 + 1 x 0 + 1 x 0 = 16 GPUs asked, 8 present.
    assert ("the config asks for 16 GPUs (policy 8 x 1, rollout 2 x 4, reference 1 x 0, "
            "reward 1 x 0) but the cluster has 8") in str(err.value)


def test_too_few_cpus_names_the_count():
    with pytest.raises(ClusterError, match=r"asks for 11 CPUs .*reward 4 x 1.* has 8"):
        check_resources(_one_node_of_8(), [{"Resources": {"CPU": 8.0, "GPU": 8.0}}])


def test_too_few_nodes_names_both_numbers_and_ignores_dead_and_cpu_only_nodes():
    dead = {"Alive": False, "Resources": dict(GPU_NODE["Resources"])}
    cfg = _one_node_of_8("cluster.num_nodes=2")
    with pytest.raises(ClusterError, match=r"cluster\.num_nodes is 2 but the cluster has 1 "
                                           r"alive nodes with GPUs"):
        check_resources(cfg, [HEAD, GPU_NODE, dead])
    check_resources(cfg, [HEAD, GPU_NODE, GPU_NODE])


def test_a_bundle_bigger_than_any_node_is_named():
    cfg = _cfg("rollout.tensor_parallel_size=8", "rollout.gpus_per_engine=8")
    four = {"Alive": True, "Resources": {"CPU": 48.0, "GPU": 4.0}}
    # 8 GPUs in all, so only the per-node check can catch it.
    with pytest.raises(ClusterError, match=r"one rollout bundle needs 8 GPUs and 1 CPUs but no "
                                           r"single node has that \(largest: 4 GPUs, 48 CPUs\)"):
        check_resources(cfg, [four, four])


def test_strict_spread_needs_a_node_per_policy_rank():
    cfg = _one_node_of_8("cluster.placement_strategy=STRICT_SPREAD")
    with pytest.raises(ClusterError, match=r"STRICT_SPREAD .* 4 policy ranks .* only 2 nodes"):
        check_resources(cfg, [HEAD, GPU_NODE, GPU_NODE])  # the head holds no GPU rank
    check_resources(cfg, [GPU_NODE] * 4)


def test_gpu_engine_bundle_must_match_tensor_parallel_size():
    cfg = _cfg("rollout.tensor_parallel_size=2", "rollout.gpus_per_engine=1")
    with pytest.raises(ClusterError, match=r"gpus_per_engine \(1\) .*tensor_parallel_size \(2\)"):
        gpu_rollout_check(cfg.rollout)
    gpu_rollout_check(_cfg("rollout.tensor_parallel_size=2").rollout)  # CPU engine: no GPUs


@pytest.mark.parametrize("override,key", [
    ("policy.gpus_per_rank=-1", "policy.gpus_per_rank"),
    ("rollout.cpus_per_engine=-0.5", "rollout.cpus_per_engine"),
    ("cluster.num_nodes=-1", "cluster.num_nodes"),
    ("reference.num_ranks=0", "reference.num_ranks"),
    ("reference.micro_batch_size=0", "reference.micro_batch_size"),
    ("reward.num_workers=0", "reward.num_workers"),
])
def test_placement_keys_out_of_range_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _cfg(override)


@pytest.mark.slow
def test_real_local_ray_without_gpus_rejects_a_gpu_config():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False,
             _node_ip_address="127.0.0.1")
    try:
        cfg = _cfg("policy.gpus_per_rank=1", "algo.kl_coef=0", "reward.cpus_per_worker=0")
        with pytest.raises(ClusterError, match=r"asks for 1 GPUs \(policy 1 x 1.* has 0"):
            check_resources(cfg)
    finally:
        ray.shutdown()


@pytest.mark.parametrize("name,gpu_nodes", [
    ("qwen2_5_vl_7b.yaml", 1), ("qwen2_5_vl_3b.yaml", 1),
    ("qwen2_5_vl_7b_2x8.yaml", 2), ("qwen2_5_vl_3b_2x8.yaml", 2),
])
def test_shipped_gpu_configs_fit_their_clusters_and_not_less(name, gpu_nodes):
    cfg = load_config(f"configs/{name}")
    check_resources(cfg, [HEAD] + [GPU_NODE] * gpu_nodes)  # ray_cluster.yaml's shape
    with pytest.raises(ClusterError, match="num_nodes"):
        check_resources(cfg, [HEAD] + [GPU_NODE] * (gpu_nodes - 1))


@pytest.mark.slow
def test_two_node_cluster_on_one_machine_counts_real_nodes():
    from ray.cluster_utils import Cluster

    # Two raylets bound to loopback. The check reads the cluster's own node table (what
    # ray.nodes() returns): a driver's ray.init would rewrite 127.0.0.1 to the machine's address.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "node_ip_address": "127.0.0.1"})
    try:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        nodes = cluster.global_state.node_table()
        # 2 x 0.5 policy + 0.5 rollout + 0.5 reward = 2 CPUs, one policy rank per node.
        small = ["policy.num_ranks=2", "policy.cpus_per_rank=0.5", "rollout.cpus_per_engine=0.5",
                 "reward.cpus_per_worker=0.5", "algo.kl_coef=0",
                 "cluster.placement_strategy=STRICT_SPREAD"]
        check_resources(_cfg(*small, "cluster.num_nodes=2"), nodes)
        with pytest.raises(ClusterError, match=r"num_nodes is 3 but the cluster has 2 alive"):
            check_resources(_cfg(*small, "cluster.num_nodes=3"), nodes)
        with pytest.raises(ClusterError, match=r"3 policy ranks .* only 2 nodes"):
            check_resources(_cfg(*small, "policy.num_ranks=3", "policy.cpus_per_rank=0.1"),
                            nodes)
    finally:
        cluster.shutdown()

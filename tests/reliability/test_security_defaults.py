"""Security defaults that are settings rather than behaviour (issue F9 item 7): remote code
stays off unless a config turns it on, and the cluster's services bind loopback."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("glimpseprune", "pipeline", "actors", "rewards")


def test_trust_remote_code_is_off_unless_a_config_turns_it_on():
    from pipeline.config import ModelConfig, load_config

    assert ModelConfig().trust_remote_code is False
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert load_config(str(path)).model.trust_remote_code is False, path.name
    # No call in the code switches it on by itself: every trust_remote_code= takes a value
    # from the config, never a literal True.
    literal = []
    for package in PACKAGES:
        for source in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(source.read_text())):
                if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" \
                        and isinstance(node.value, ast.Constant) and node.value.value:
                    literal.append(f"{source.relative_to(ROOT)}:{node.value.lineno}")
    assert literal == []


def test_the_cluster_dashboard_and_mlflow_bind_loopback_with_token_auth():
    cluster = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    head = " ".join(cluster["head_start_ray_commands"])
    workers = " ".join(cluster["worker_start_ray_commands"])
    assert "ray start --head" in head and "--dashboard-host=127.0.0.1" in head
    assert "mlflow server --host 127.0.0.1" in head
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in workers
    assert "0.0.0.0" not in (ROOT / "ray_cluster.yaml").read_text()

"""What a launch exposes: no secret travels in a job (Ray shows a job's runtime_env and config on
its dashboard), and the dashboard listens beyond loopback only with Ray's token authentication on.
No Ray cluster is needed: the checks run before anything is started or submitted."""
from pathlib import Path

import pytest
import yaml

from autoprune_ray.engine.config import ConfigError, RunConfig, from_dict
from autoprune_ray.engine.launch import (ClusterConfig, job_spec, load_cluster, refuse_secrets, resolve_search,
                                         secret_name, secret_value)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def cluster_file(tmp_path, runtime_env, search=None):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"address": "http://127.0.0.1:8265", "runtime_env": runtime_env,
                                    "search": search or {"name": "c"}}))
    return path


# -- secrets ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["OPENAI_API_KEY", "HF_TOKEN", "hf_token", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD",
                                  "GOOGLE_APPLICATION_CREDENTIALS", "MY_AUTH", "APIKEY", "OAUTH", "SMTP_PASSWD"])
def test_a_cluster_file_with_a_secret_variable_name_is_refused(tmp_path, name):
    with pytest.raises(ConfigError) as refused:
        load_cluster(cluster_file(tmp_path, {"env_vars": {name: "x"}}))
    message = str(refused.value)
    assert message.startswith(f"runtime_env.env_vars.{name}: ") and "\n" not in message
    assert "`ray start`" in message and "policy.api_key_env" in message


@pytest.mark.parametrize("value", ["sk-proj-4f9aK2mQ7xZp1LrT8vWc", "hf_AbCdEfGhIjKlMnOpQrStUv",
                                   "ghp_0123456789abcdefABCDEF", "AKIAIOSFODNN7EXAMPLE1234",
                                   "q8Zr2Lk9Xw4Tn7Vb1Hm5Jc3Fy6Dp0GsA",              # 32 random base62
                                   "https://user:p4ssw0rd@example.com/simple"])
def test_a_value_that_looks_like_a_secret_is_refused_whatever_its_name(tmp_path, value):
    with pytest.raises(ConfigError, match=r"^runtime_env\.env_vars\.ENDPOINT: its value looks like a secret"):
        load_cluster(cluster_file(tmp_path, {"env_vars": {"ENDPOINT": value}}))


def test_a_password_in_a_pip_url_is_refused(tmp_path):
    env = {"pip": ["git+https://me:ghp_0123456789abcdefABCDEF@github.com/me/repo.git"]}
    with pytest.raises(ConfigError, match=r"^runtime_env\.pip\[0\]: .*netrc"):
        load_cluster(cluster_file(tmp_path, env))


def test_a_secret_in_the_search_config_is_refused_before_submitting():
    cfg = RunConfig(name="c")
    cfg.policy.base_url = "https://me:p4ssw0rd@endpoint.example.com/v1"
    with pytest.raises(ConfigError, match=r"^search\.policy\.base_url: its value looks like a secret"):
        job_spec(ClusterConfig(), cfg)


@pytest.mark.parametrize("name", ["TOKENIZERS_PARALLELISM", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "HF_TOKEN_PATH",
                                  "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "KEYBOARD_LAYOUT", "AUTHOR"])
def test_ordinary_variable_names_pass(name):
    assert not secret_name(name)


@pytest.mark.parametrize("value", ["false", "HuggingFaceTB/SmolLM2-135M-Instruct", "expandable_segments:True",
                                   "/data/MyVeryLongDirectoryName2026Version3/x", "http://127.0.0.1:9/v1",
                                   "8a6df702561493a13848981a6459b6cebc70f5e3",       # a git commit
                                   "AutoPruneRay2026ClusterExperimentNumber1", "def score(W, A): return W.abs()"])
def test_ordinary_values_pass(value):
    assert not secret_value(value)


def test_the_shipped_cluster_file_and_an_api_key_env_pass(monkeypatch):
    monkeypatch.setenv("MY_ENDPOINT_KEY", "sk-proj-4f9aK2mQ7xZp1LrT8vWc")   # on the nodes, named, never sent
    cluster = load_cluster(CONFIGS / "cluster.yaml")
    cfg = resolve_search(cluster)
    cfg.policy.api_key_env = "MY_ENDPOINT_KEY"
    spec = job_spec(cluster, cfg)
    assert spec["runtime_env"]["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    assert "sk-proj" not in repr(spec)
    refuse_secrets({"env_vars": {"TOKENIZERS_PARALLELISM": "false"}, "working_dir": "."})


# -- the dashboard ------------------------------------------------------------------------------------
def ray_config(**ray) -> RunConfig:
    return from_dict(RunConfig, {"ray": ray}).validate()


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "head.example.com", "::"])
def test_an_exposed_dashboard_is_refused_while_token_auth_is_disabled(monkeypatch, host):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(ConfigError) as refused:
        ray_config(include_dashboard=True, dashboard_host=host)
    message = str(refused.value)
    assert message.startswith(f"ray.dashboard_host: {host!r} ") and "\n" not in message
    assert "token authentication" in message and "RAY_AUTH_MODE" in message


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_a_loopback_dashboard_passes_with_token_auth_disabled(monkeypatch, host):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert ray_config(include_dashboard=True, dashboard_host=host).ray.dashboard_host == host


@pytest.mark.parametrize("mode", [None, "token"])
def test_an_exposed_dashboard_passes_with_token_auth_on(monkeypatch, mode):
    if mode is None:
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)   # Ray 2.60's default: token authentication on
    else:
        monkeypatch.setenv("RAY_AUTH_MODE", mode)
    assert ray_config(include_dashboard=True, dashboard_host="0.0.0.0").ray.dashboard_exposed()

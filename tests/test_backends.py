"""Policy backends: scripted, OpenAI-compatible HTTP (against a local server), transformers with
peft LoRA adapters (tiny model), and vLLM where it is importable."""
import importlib.util
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from autoprune_ray.llm.backends import (SYSTEM_PROMPT, OpenAIBackend, ScriptedBackend, TransformersBackend,
                                        VLLMBackend, make_backend)


def test_scripted_backend_cycles_in_prompt_order_and_labels_adapters():
    backend = ScriptedBackend(["a", "b", "c"])
    out = backend.generate(["p0", "p1"], n=2)
    assert [(c.prompt_index, c.text) for c in out] == [(0, "a"), (0, "b"), (1, "c"), (1, "a")]
    assert all(c.adapter is None for c in out)
    backend.load_adapter("/tmp/adapter-1", "v1")
    assert backend.generate(["p"])[0].adapter == "v1"
    with pytest.raises(TypeError, match="list of strings"):
        backend.generate("one prompt")
    with pytest.raises(ValueError, match="n and max_new_tokens"):
        backend.generate(["p"], n=0)
    with pytest.raises(ValueError, match="non-empty"):
        ScriptedBackend([])


def test_make_backend_names_the_choices():
    assert isinstance(make_backend("scripted", completions=["x"]), ScriptedBackend)
    with pytest.raises(ValueError, match="choose one of openai, scripted, transformers, vllm"):
        make_backend("gpt")


# ---------------------------------------------------------------- OpenAI-compatible HTTP

class FakeServer:
    """A local OpenAI-compatible endpoint that records requests and answers from a script."""

    def __init__(self):
        self.requests = []
        self.status = 200
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((self.path, dict(self.headers), body))
                if server.status != 200:
                    self.send_response(server.status)
                    self.end_headers()
                    self.wfile.write(b'{"error": "model not found"}')
                    return
                n = body.get("n", 1)
                # choices deliberately out of order: the client must sort them by index
                choices = [{"index": k, "message": {"role": "assistant", "content": f"{body.get('model')}:{k}"}}
                           for k in reversed(range(n))]
                reply = json.dumps({"choices": choices, "usage": {"completion_tokens": 5}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


def test_openai_backend_sends_the_chat_request_and_reads_choices(server, monkeypatch):
    backend = OpenAIBackend(server.url, model="policy-base", api_key_env="TEST_POLICY_KEY")
    monkeypatch.setenv("TEST_POLICY_KEY", "secret-1")        # read at call time, not stored
    out = backend.generate(["write a metric"], n=2, temperature=0.5, max_new_tokens=64, seed=3)
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == "Bearer secret-1"
    assert body["messages"] == [{"role": "system", "content": SYSTEM_PROMPT},
                                {"role": "user", "content": "write a metric"}]
    assert (body["model"], body["n"], body["temperature"], body["max_tokens"], body["seed"]) == \
        ("policy-base", 2, 0.5, 64, 3)
    assert [c.text for c in out] == ["policy-base:0", "policy-base:1"]
    assert [c.tokens for c in out] == [3, 2] and backend.tokens_generated == 5
    assert "secret-1" not in repr(backend)


def test_openai_backend_switches_model_to_the_adapter(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    backend = OpenAIBackend(server.url, model="base", runtime_lora=True)
    backend.load_adapter("/adapters/v2", "policy-v2")
    assert server.requests[0][0] == "/v1/load_lora_adapter"
    assert server.requests[0][2] == {"lora_name": "policy-v2", "lora_path": "/adapters/v2"}
    out = backend.generate(["p"])
    assert server.requests[1][2]["model"] == "policy-v2" and out[0].adapter == "policy-v2"
    assert "Authorization" not in server.requests[1][1]


def test_openai_backend_errors_are_clear(server):
    server.status = 404
    with pytest.raises(RuntimeError, match="answered HTTP 404: .*model not found"):
        OpenAIBackend(server.url, model="m").generate(["p"])
    with pytest.raises(RuntimeError, match="unreachable"):
        OpenAIBackend("http://127.0.0.1:9/v1", model="m", timeout=2).generate(["p"])
    with pytest.raises(ValueError, match="base_url"):
        OpenAIBackend("", model="m")


# ---------------------------------------------------------------- transformers + peft

@pytest.fixture(scope="module")
def tiny_policy(tiny_model_dir):
    return TransformersBackend(str(tiny_model_dir), device="cpu", batch_size=3)


def test_transformers_backend_generates_n_per_prompt_in_order(tiny_policy):
    out = tiny_policy.generate(["the cat", "she said"], n=2, temperature=0.0, max_new_tokens=6)
    assert [c.prompt_index for c in out] == [0, 0, 1, 1]
    assert all(1 <= c.tokens <= 6 and c.seconds > 0 for c in out)
    assert out[0].text == out[1].text          # greedy: the same prompt gives the same text
    sampled = tiny_policy.generate(["the cat"], n=3, temperature=1.0, max_new_tokens=6, seed=0)
    again = tiny_policy.generate(["the cat"], n=3, temperature=1.0, max_new_tokens=6, seed=0)
    assert [c.text for c in sampled] == [c.text for c in again]


def save_lora(model_dir, out_dir, seed):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    # init_lora_weights=False: random B, so the adapter really changes the outputs
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 init_lora_weights=False, lora_alpha=64))
    peft_model.save_pretrained(out_dir)
    return out_dir


def test_transformers_backend_hot_loads_lora_adapters(tiny_model_dir, tmp_path):
    pytest.importorskip("peft")
    backend = TransformersBackend(str(tiny_model_dir), device="cpu")
    logits = lambda: backend.model(torch.tensor([[1, 2, 3, 4]])).logits  # noqa: E731
    base = logits()
    backend.load_adapter(save_lora(tiny_model_dir, tmp_path / "a1", seed=1), "v1")
    first = logits()
    assert backend.adapter_version == "v1" and not torch.allclose(base, first)
    backend.load_adapter(save_lora(tiny_model_dir, tmp_path / "a2", seed=2), "v2")
    assert not torch.allclose(first, logits())
    assert list(backend.model.peft_config) == ["adapter_1"]         # the previous adapter is freed
    assert backend.generate(["the"], max_new_tokens=2)[0].adapter == "v2"


# ---------------------------------------------------------------- vLLM

def test_vllm_backend_refuses_ray_executor_and_explains_missing_vllm():
    with pytest.raises(ValueError, match="deadlocks inside a Ray actor"):
        VLLMBackend("smollm2", distributed_executor_backend="ray")
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ImportError, match="CUDA build"):
            VLLMBackend("smollm2")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(),
                    reason="vLLM needs its CUDA build and a GPU")
def test_vllm_backend_generates(tiny_model_dir):
    backend = VLLMBackend(str(tiny_model_dir), enable_lora=False, gpu_memory_utilization=0.2)
    out = backend.generate(["the cat", "she said"], n=2, temperature=0.0, max_new_tokens=4)
    assert [c.prompt_index for c in out] == [0, 0, 1, 1] and all(c.tokens >= 1 for c in out)

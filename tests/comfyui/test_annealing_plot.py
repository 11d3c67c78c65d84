"""The Annealing Guidance node's plot, server side (nodes/annealing_plot.py): the preview route answers the selected
policy evaluated over progress (and JSON errors), over real HTTP (aiohttp, the route table ComfyUI's PromptServer
adds to its app); after a run through ComfyUI's sampler the message carries exactly the w_t the plan used (the
logged values); without a server nothing is sent and nothing fails.

ComfyUI's PromptServer cannot be built inside this test process (its imports need ComfyUI's own sys.path), so the
server here is a recorder with PromptServer's interface (``routes``, ``client_id``, ``send_sync(event, data,
sid)``), checked against ComfyUI's server.py source by the compatibility contract test (server.PromptServer)."""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import asyncio
import logging
import re
import sys
import types

import pytest
import torch

from guidance_kit.digits.train_guidance_policy import POLICY_WEIGHTS
from guidance_kit.guiders.methods.annealing_guidance import load_policy
from guidance_kit.nodes import annealing_plot
from guidance_kit.nodes.annealing_guidance import PACK_POLICY, AnnealingGuidanceNode

from .harness import out

STEPS = 6


class RecordingServer:
    """PromptServer's interface as the pack uses it: a route table, the client id of the prompt, send_sync."""

    def __init__(self, client_id="client-1"):
        from aiohttp import web

        self.routes = web.RouteTableDef()
        self.client_id = client_id
        self.sent = []

    def send_sync(self, event, data, sid=None):
        self.sent.append((event, data, sid))


@pytest.fixture
def server(monkeypatch):
    """A ``server`` module whose PromptServer.instance is a RecordingServer (as ComfyUI's main.py sets it)."""
    recorder = RecordingServer()
    module = types.ModuleType("server")
    module.PromptServer = type("PromptServer", (), {"instance": recorder})
    monkeypatch.setitem(sys.modules, "server", module)
    return recorder


def test_the_preview_is_the_policy_evaluated_directly():
    payload = annealing_plot.preview_payload(PACK_POLICY, "0.3")
    policy = load_policy(POLICY_WEIGHTS)
    normalization = policy.config["delta_embed_normalization"]
    assert [c["delta_norm"] for c in payload["levels"]] == [normalization * k for k in annealing_plot.DELTA_LEVELS]
    assert len(payload["progress"]) == annealing_plot.PREVIEW_POINTS and payload["progress"][0] == 0.0
    for curve in payload["levels"]:
        assert curve["label"] == f"‖δ‖ {curve['delta_norm']:g}"
        for p, t, w in zip(payload["progress"], payload["timestep"], curve["w"]):
            assert t == pytest.approx(999.0 * (1.0 - p))
            direct = float(policy(t, torch.tensor([curve["delta_norm"]]), 0.3)[0])
            assert w == pytest.approx(direct, abs=1e-5)
    # the shipped policy anneals (larger scales at high noise) and λ orders the strength
    middle = payload["levels"][1]["w"]
    assert middle[0] > middle[-1]
    high = annealing_plot.preview_payload(PACK_POLICY, "0.9", delta="20", points="5")
    assert len(high["levels"]) == 1 and len(high["progress"]) == 5
    assert sum(high["levels"][0]["w"]) / 5 > sum(annealing_plot.preview_payload(PACK_POLICY, "0.1", delta="20",
                                                                                   points="5")["levels"][0]["w"]) / 5


@pytest.mark.parametrize("query, message", [
    ({"lambda": "0.5"}, "'policy' is missing"),
    ({"policy": PACK_POLICY}, "'lambda' is missing"),
    ({"policy": PACK_POLICY, "lambda": "abc"}, "'lambda' must be a number"),
    ({"policy": PACK_POLICY, "lambda": "1.5"}, r"λ must lie in \[0, 1\]"),
    ({"policy": PACK_POLICY, "lambda": "0.5", "delta": "1,-2"}, "'delta' takes 1 to 6 non-negative numbers"),
    ({"policy": PACK_POLICY, "lambda": "0.5", "points": "1"}, r"'points' must lie in \[2, 201\]"),
    ({"policy": "gone.safetensors", "lambda": "0.5"}, "no policy file 'gone.safetensors'"),
])
def test_bad_requests_answer_a_json_error(query, message):
    with pytest.raises(annealing_plot.PreviewError, match=message):
        annealing_plot.preview_payload(query.get("policy"), query.get("lambda"), query.get("delta"),
                                       query.get("points"))


def test_the_route_over_http(server):
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    assert annealing_plot.register_routes() is True
    assert annealing_plot.register_routes() is True  # once: a second registration adds nothing
    assert [r.path for r in server.routes] == [annealing_plot.PREVIEW_ROUTE]

    async def requests():
        app = web.Application()
        app.add_routes(server.routes)
        async with TestClient(TestServer(app)) as client:
            good = await client.get(annealing_plot.PREVIEW_ROUTE, params={"policy": PACK_POLICY, "lambda": "0.4"})
            bad = await client.get(annealing_plot.PREVIEW_ROUTE, params={"policy": "nope.pt", "lambda": "0.4"})
            return good.status, await good.json(), bad.status, await bad.json()

    status, payload, bad_status, error = asyncio.run(requests())
    assert status == 200 and payload == annealing_plot.preview_payload(PACK_POLICY, "0.4")
    assert bad_status == 400 and "no policy file 'nope.pt'" in error["error"]


def test_no_server_no_routes_and_no_message(monkeypatch):
    monkeypatch.delitem(sys.modules, "server", raising=False)
    assert annealing_plot.prompt_server() is None
    assert annealing_plot.register_routes() is False
    assert annealing_plot.PlotSender("3")({"steps": []}) is False


def sample(loaded, model, digits, cfg=3.0, sampler="euler"):
    import nodes

    return nodes.common_ksampler(model, 0, STEPS, cfg, sampler, "normal", loaded.conditioning(digits),
                                 loaded.null_conditioning(len(digits)),
                                 {"samples": torch.zeros(len(digits), 1, 8, 8)})[0]["samples"]


def node_with_id(unique_id):
    """The node class as ComfyUI's executor prepares it for one prompt (hidden inputs: the node's unique id)."""
    from comfy_api.latest import io

    return AnnealingGuidanceNode.PREPARE_CLASS_CLONE({io.Hidden.unique_id: unique_id})


def logged_steps(caplog):
    text = next(r.getMessage() for r in caplog.records if "chosen scale w_t per step" in r.getMessage())
    return [(float(s), float(m), float(lo), float(hi)) for s, m, lo, hi in
            re.findall(r"σ ([\d.e+-]+): ([\d.e+-]+) \(([\d.e+-]+)–([\d.e+-]+)\)", text)]


def test_a_run_sends_the_scales_the_plan_used(server, loaded, caplog):
    model = out(node_with_id("12").execute(loaded.patcher, 0.6))
    plain = out(AnnealingGuidanceNode.execute(loaded.patcher, 0.6))  # outside a prompt: no id, nothing to send
    with caplog.at_level(logging.INFO, logger="guidance_kit"):
        guided = sample(loaded, model, [1, 4, 7])
    assert len(server.sent) == 1
    event, message, sid = server.sent[0]
    assert event == annealing_plot.EVENT and sid == "client-1" and message["node"] == "12"
    assert message["policy"] == "digits_guidance_policy.safetensors" and message["lambda"] == 0.6
    steps = message["steps"]
    assert len(steps) == STEPS
    # the logged values (3 significant digits) are the message's
    for entry, (sigma, mean, low, high) in zip(steps, logged_steps(caplog)):
        assert (f"{entry['sigma']:.3g}", f"{entry['mean']:.3g}", f"{entry['min']:.3g}", f"{entry['max']:.3g}") == \
            (f"{sigma:.3g}", f"{mean:.3g}", f"{low:.3g}", f"{high:.3g}")
        assert entry["min"] <= entry["mean"] <= entry["max"] and entry["min"] < entry["max"]  # three digits differ
    progress = [e["progress"] for e in steps]
    assert progress[0] == pytest.approx(0.0, abs=1e-3) and progress == sorted(progress) and progress[-1] < 1.0
    assert torch.equal(guided, sample(loaded, plain, [1, 4, 7])) and len(server.sent) == 1  # no id: no message

    # every run sends its own values (nothing kept between runs), to the client of that prompt
    server.client_id = "client-2"
    sample(loaded, model, [1, 4, 7], cfg=1.0)
    assert len(server.sent) == 2 and server.sent[1][2] == "client-2"
    assert server.sent[1][1]["steps"] == steps  # the policy replaces cfg: the same scales at cfg 1
    server.client_id = None  # no page queued the prompt (API): nothing sent, as ComfyUI's own progress messages
    sample(loaded, model, [1, 4, 7])
    assert len(server.sent) == 2


def test_without_a_server_a_run_sends_nothing_and_succeeds(monkeypatch, loaded):
    monkeypatch.delitem(sys.modules, "server", raising=False)
    model = out(node_with_id("5").execute(loaded.patcher, 0.5))
    result = sample(loaded, model, [2, 3])
    assert torch.isfinite(result).all()


def test_a_failing_sender_is_logged_not_raised(monkeypatch, loaded, caplog):
    class Broken(RecordingServer):
        def send_sync(self, event, data, sid=None):
            raise ConnectionError("socket closed")

    module = types.ModuleType("server")
    module.PromptServer = type("PromptServer", (), {"instance": Broken()})
    monkeypatch.setitem(sys.modules, "server", module)
    model = out(node_with_id("5").execute(loaded.patcher, 0.5))
    with caplog.at_level(logging.WARNING, logger="guidance_kit"):
        result = sample(loaded, model, [2])
    assert torch.isfinite(result).all()
    assert any("end-of-run hook failed: socket closed" in r.getMessage() for r in caplog.records)

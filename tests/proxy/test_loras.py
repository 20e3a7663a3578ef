"""LoRA adapters through the proxy, on fake backends: a request's `model` naming an adapter
the model lists reaches the base's Triton model with the `lora` input on every front end;
an unknown name is 404 model_not_found; /v1/models lists adapters under their parent; the
admin key alone opens load/unload, which go to every replica (all or none) and refuse path
shapes no root could hold; affinity routing keeps an adapter+image on one replica within a
bounded load; the per-model and per-replica metrics."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import pytest
from hardening_helpers import assert_envelope
from helpers import data_url
from proxy_fakes import (
    PNG_BYTES,
    SERVED_MODEL,
    TEST_CONFIG,
    TRITON_MODEL,
    FakeBackend,
    script,
    serving,
    serving_app,
)
from test_metrics import delta, scrape

from proxy.app import create_app, upstream_observers
from proxy.config import with_settings
from proxy.error_catalogue import BACKEND_UNAVAILABLE
from proxy.keys import BACKEND_KEY
from proxy.observability.metrics import METRICS_KEY
from proxy.serving.routes import ROUTES_KEY, Admit, Auth
from proxy.transport.backend import GenerationChunk, TritonRequest
from proxy.transport.contract import LoraAdapter, Task
from proxy.transport.loras import MAX_LABELLED_ADAPTERS, OTHER_ADAPTERS, LoraCatalog
from proxy.transport.upstreams import BOUNDED_LOAD_FACTOR, LEAST_BUSY, Upstreams

ADAPTER = "sql-lora"
ADMIN = "admin-s3cret"
CLIENT = "client-key"
HI = [{"role": "user", "content": "hi"}]
IMAGE_MESSAGE = [
    {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": data_url(PNG_BYTES, "image/png")}},
            {"type": "text", "text": "what is it?"},
        ],
    }
]


def with_adapter(*chunks: GenerationChunk) -> FakeBackend:
    backend = FakeBackend(list(chunks) or None)
    backend.loras[ADAPTER] = LoraAdapter(ADAPTER, 16, vision=True)
    return backend


# ---- resolution on every front end ---------------------------------------------------------

# (path, body naming `model`, the request's task, where the answer echoes the model)
FRONT_ENDS = [
    ("/v1/chat/completions", {"messages": HI}, Task.GENERATE, "model"),
    ("/v1/completions", {"prompt": "hi"}, Task.GENERATE, "model"),
    ("/v1/responses", {"input": "hi", "store": False}, Task.GENERATE, "model"),
    ("/v1/messages", {"messages": HI, "max_tokens": 8}, Task.GENERATE, "model"),
    ("/tokenize", {"prompt": "hi"}, Task.TOKENIZE, None),
    ("/detokenize", {"tokens": [1, 2]}, Task.DETOKENIZE, None),
]


@pytest.mark.parametrize("path, body, task, echoed", FRONT_ENDS, ids=[f[0] for f in FRONT_ENDS])
async def test_an_adapter_name_reaches_the_base_model_with_the_lora_input(
    make_client, path, body, task, echoed
):
    backend = with_adapter()
    client = await make_client(backend)
    response = await client.post(path, json={**body, "model": ADAPTER})
    assert response.status == 200, await response.text()
    request = backend.served_requests[-1][0]
    assert (request.model, request.lora, request.task) == (TRITON_MODEL, ADAPTER, task)
    if echoed:
        assert (await response.json())[echoed] == ADAPTER
    # the base name still runs the base weights
    assert (await client.post(path, json={**body, "model": SERVED_MODEL})).status == 200
    assert backend.served_requests[-1][0].lora is None


@pytest.mark.parametrize("path, body, task, echoed", FRONT_ENDS, ids=[f[0] for f in FRONT_ENDS])
async def test_an_unknown_name_is_404_model_not_found(make_client, path, body, task, echoed):
    backend = with_adapter()
    client = await make_client(backend)
    response = await client.post(path, json={**body, "model": "sql-lora-2"})
    assert response.status == 404
    payload = await response.json()
    if path == "/v1/messages":  # Anthropic's envelope
        assert payload["error"]["type"] == "not_found_error"
        message = payload["error"]["message"]
    else:
        message = assert_envelope(payload, "model_not_found")["message"]
    assert message.startswith("The model `sql-lora-2` does not exist.")
    assert backend.served_requests == []


async def test_unknown_names_ask_the_model_at_most_once_per_interval():
    clock = [100.0]
    backend = FakeBackend()
    catalog = LoraCatalog(
        backend, {SERVED_MODEL: TRITON_MODEL}, SERVED_MODEL, clock=lambda: clock[0]
    )
    results = await asyncio.gather(
        *(catalog.resolve(f"nope-{i}") for i in range(5)), return_exceptions=True
    )
    assert all(getattr(r, "code", None) == "model_not_found" for r in results)
    assert len(backend.requests) == 1  # concurrent askers shared one question
    backend.loras[ADAPTER] = LoraAdapter(ADAPTER, 8)
    with pytest.raises(Exception, match="does not exist"):
        await catalog.resolve(ADAPTER)  # loaded elsewhere a moment ago: not asked yet
    clock[0] += 5
    assert (await catalog.resolve(ADAPTER)).lora == ADAPTER
    assert len(backend.requests) == 2


async def test_a_model_that_cannot_list_adapters_serves_its_base_names():
    backend = FakeBackend()
    backend.lora_answer = lambda request: "not json"  # a contract bug, or an older model
    catalog = LoraCatalog(backend, {SERVED_MODEL: TRITON_MODEL}, SERVED_MODEL)
    assert (await catalog.resolve(None)).served_name == SERVED_MODEL
    with pytest.raises(Exception, match="does not exist"):
        await catalog.resolve(ADAPTER)


# ---- /v1/models --------------------------------------------------------------------------


async def test_models_list_adapters_with_their_parent(make_client):
    client = await make_client(with_adapter(), model_map=(("alias", TRITON_MODEL),))
    cards = {card["id"]: card for card in (await (await client.get("/v1/models")).json())["data"]}
    assert set(cards) == {SERVED_MODEL, "alias", ADAPTER}
    assert (cards[SERVED_MODEL]["parent"], cards[SERVED_MODEL]["root"]) == (None, SERVED_MODEL)
    assert (cards[ADAPTER]["parent"], cards[ADAPTER]["root"]) == (SERVED_MODEL, SERVED_MODEL)
    one = await client.get(f"/v1/models/{ADAPTER}")
    assert one.status == 200 and (await one.json())["parent"] == SERVED_MODEL
    assert (await client.get("/v1/models/other-lora")).status == 404


# ---- load / unload: the admin key --------------------------------------------------------

LOAD = {"lora_name": "new-lora", "lora_path": "loras/new"}


def admin(key: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_without_an_admin_key_the_endpoints_do_not_exist(make_client):
    client = await make_client(FakeBackend())
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        response = await client.post(path, json=LOAD, headers=admin())
        assert response.status == 404
        assert_envelope(await response.json(), "not_found")


def test_the_admin_routes_are_admitted_writes_from_the_table():
    from test_routes import policy_faults

    app = create_app(with_settings(TEST_CONFIG, admin_api_key=ADMIN), FakeBackend())
    assert policy_faults(app) == []
    labels = {entry.label: entry for entry in app[ROUTES_KEY].values()}
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        assert (labels[path].admit, labels[path].auth) == (Admit.WRITE, Auth.ADMIN)


@pytest.mark.parametrize("api_key", ["", CLIENT])
async def test_only_the_admin_key_opens_them(make_client, api_key):
    backend = FakeBackend()
    client = await make_client(backend, admin_api_key=ADMIN, api_key=api_key)
    for headers in ({}, admin(CLIENT), admin("wrong"), {"x-api-key": ADMIN}):
        response = await client.post("/v1/load_lora_adapter", json=LOAD, headers=headers)
        assert response.status == 401
        assert_envelope(await response.json(), "invalid_api_key")
    assert backend.loras == {}
    response = await client.post("/v1/load_lora_adapter", json=LOAD, headers=admin())
    assert response.status == 200
    assert await response.text() == "Success: LoRA adapter 'new-lora' added successfully."
    assert backend.loras["new-lora"].name == "new-lora"
    load = [r for r, _ in backend.requests if r.task is Task.LOAD_LORA][0]
    assert (load.model, load.lora, load.lora_path) == (TRITON_MODEL, "new-lora", "loras/new")
    if api_key:  # and the admin key is no client key
        response = await client.post("/v1/chat/completions", json={"messages": HI}, headers=admin())
        assert response.status == 401


async def test_a_loaded_adapter_serves_then_unloads(make_client):
    backend = FakeBackend()
    client = await make_client(backend, admin_api_key=ADMIN)
    chat = {"model": "new-lora", "messages": HI}
    assert (await client.post("/v1/chat/completions", json=chat)).status == 404
    assert (await client.post("/v1/load_lora_adapter", json=LOAD, headers=admin())).status == 200
    assert (await client.post("/v1/chat/completions", json=chat)).status == 200
    again = await client.post("/v1/load_lora_adapter", json=LOAD, headers=admin())
    assert again.status == 400
    assert_envelope(await again.json(), "lora_already_loaded")
    unload = {"lora_name": "new-lora"}
    response = await client.post("/v1/unload_lora_adapter", json=unload, headers=admin())
    assert response.status == 200
    assert await response.text() == "Success: LoRA adapter 'new-lora' removed successfully."
    assert (await client.post("/v1/chat/completions", json=chat)).status == 404
    response = await client.post("/v1/unload_lora_adapter", json=unload, headers=admin())
    assert response.status == 404
    assert_envelope(await response.json(), "model_not_found")


class YieldingLoads(FakeBackend):
    """Its loads give the event loop a turn before answering, as a real load does."""

    async def generate(self, request: TritonRequest, request_id: str):
        if request.task is Task.LOAD_LORA:
            await asyncio.sleep(0)
        async for chunk in super().generate(request, request_id):
            yield chunk


async def test_two_loads_of_one_name_do_not_undo_each_other(make_client):
    backend = YieldingLoads()
    client = await make_client(backend, admin_api_key=ADMIN)
    responses = await asyncio.gather(
        *(client.post("/v1/load_lora_adapter", json=LOAD, headers=admin()) for _ in range(2))
    )
    assert sorted(r.status for r in responses) == [200, 400]
    assert "new-lora" in backend.loras
    chat = {"model": "new-lora", "messages": HI}
    assert (await client.post("/v1/chat/completions", json=chat)).status == 200


BAD_BODIES = [
    ({"lora_path": "loras/x"}, "missing_required_parameter", "lora_name"),
    ({"lora_name": 3, "lora_path": "loras/x"}, "invalid_type", "lora_name"),
    ({"lora_name": "has space", "lora_path": "loras/x"}, "invalid_lora_name", "lora_name"),
    ({"lora_name": "x" * 129, "lora_path": "loras/x"}, "invalid_lora_name", "lora_name"),
    ({"lora_name": SERVED_MODEL, "lora_path": "loras/x"}, "lora_already_loaded", "lora_name"),
    ({"lora_name": "x"}, "missing_required_parameter", "lora_path"),
    ({"lora_name": "x", "lora_path": ""}, "invalid_lora_path", "lora_path"),
    ({"lora_name": "x", "lora_path": "/models/loras/../../etc"}, "invalid_lora_path", "lora_path"),
    ({"lora_name": "x", "lora_path": "..\\secrets"}, "invalid_lora_path", "lora_path"),
    ({"lora_name": "x", "lora_path": "loras/x\x00.json"}, "invalid_lora_path", "lora_path"),
    ({"lora_name": "x", "lora_path": "/" + "a" * 4096}, "invalid_lora_path", "lora_path"),
    ({"lora_name": "x", "lora_path": ["loras/x"]}, "invalid_type", "lora_path"),
]


@pytest.mark.parametrize("body, code, param", BAD_BODIES)
async def test_bad_load_bodies_are_refused_before_any_replica(make_client, body, code, param):
    backend = FakeBackend()
    client = await make_client(backend, admin_api_key=ADMIN)
    response = await client.post("/v1/load_lora_adapter", json=body, headers=admin())
    assert response.status == 400
    error = assert_envelope(await response.json(), code)
    assert error["param"] == param
    assert [r for r, _ in backend.requests if r.task is Task.LOAD_LORA] == []


# ---- several replicas --------------------------------------------------------------------


def replicas(*backends: FakeBackend, **settings) -> Upstreams:
    """Upstreams over `backends`, one per address 10.0.0.<i>:1."""
    by_address = {f"10.0.0.{i}:1": backend for i, backend in enumerate(backends, 1)}

    async def resolve(host: str, port: int) -> list[str]:
        return [address.rsplit(":", 1)[0] for address in by_address]

    return Upstreams(
        [("replicas", 1)],
        resolve=resolve,
        backend_factory=by_address.__getitem__,
        resolve_every_s=0,
        **settings,
    )


@contextlib.asynccontextmanager
async def admin_client(*backends: FakeBackend):
    config = with_settings(TEST_CONFIG, admin_api_key=ADMIN)
    async with serving(config, replicas(*backends)) as client:
        yield client


async def test_load_and_unload_go_to_every_replica():
    backends = FakeBackend(), FakeBackend()
    async with admin_client(*backends) as client:
        assert (
            await client.post("/v1/load_lora_adapter", json=LOAD, headers=admin())
        ).status == 200
        assert all("new-lora" in b.loras for b in backends)
        unload = {"lora_name": "new-lora"}
        response = await client.post("/v1/unload_lora_adapter", json=unload, headers=admin())
        assert response.status == 200
        assert all(b.loras == {} for b in backends)


async def test_a_load_one_replica_refuses_is_undone_on_the_others():
    backends = FakeBackend(), FakeBackend()

    def refuse(request: TritonRequest) -> str:
        raise BACKEND_UNAVAILABLE()

    backends[1].lora_answer = lambda request: (
        refuse(request) if request.task is Task.LOAD_LORA else "[]"
    )
    async with admin_client(*backends) as client:
        response = await client.post("/v1/load_lora_adapter", json=LOAD, headers=admin())
        assert response.status == 503
        assert backends[0].loras == {}  # loaded, then unloaded again
        chat = {"model": "new-lora", "messages": HI}
        assert (await client.post("/v1/chat/completions", json=chat)).status == 404


async def test_an_unload_a_replica_never_had_still_unloads_the_others():
    backends = FakeBackend(), FakeBackend()
    backends[0].loras[ADAPTER] = LoraAdapter(ADAPTER, 8)
    async with admin_client(*backends) as client:
        unload = {"lora_name": ADAPTER}
        response = await client.post("/v1/unload_lora_adapter", json=unload, headers=admin())
        assert response.status == 200
        assert backends[0].loras == {}


# ---- routing -----------------------------------------------------------------------------


def request(lora: str | None = None, image: bytes | None = None) -> TritonRequest:
    media = {"image": [image]} if image is not None else {}
    return TritonRequest(TRITON_MODEL, "[]", media, {}, stream=True, lora=lora)


async def routed(upstreams: Upstreams, triton_request: TritonRequest) -> str:
    """The address `triton_request` is sent to (it runs to its end)."""
    await upstreams.refresh()
    chosen = upstreams.pick_for(triton_request)
    async for _ in upstreams.generate(triton_request, "r"):
        pass
    return chosen.address


async def test_the_same_adapter_and_image_go_to_the_same_replica():
    upstreams = replicas(*(FakeBackend() for _ in range(3)))
    keys = [(lora, bytes([seed]) * 64) for lora in (None, "a", "b") for seed in range(8)]
    first = {key: await routed(upstreams, request(*key)) for key in keys}
    for key in reversed(keys):  # one at a time: no replica is past its bounded load
        assert await routed(upstreams, request(*key)) == first[key]
    assert len(set(first.values())) == 3  # and the keys spread over the replicas
    assert await routed(upstreams, request("a")) == await routed(upstreams, request("a"))


async def test_a_busy_preferred_replica_spills_to_the_least_busy():
    upstreams = replicas(FakeBackend(), FakeBackend())
    await upstreams.refresh()
    key = request("a", PNG_BYTES)
    preferred = upstreams.pick_for(key)
    other = next(u for u in upstreams.upstreams if u is not preferred)
    preferred.in_flight = 2  # 3 of 3 in flight with this one: past 1.25 x 1.5
    assert upstreams.pick_for(key) is other
    preferred.in_flight, other.in_flight = 1, 0  # 2 of 2 with this one: within 1.25 x 1
    assert BOUNDED_LOAD_FACTOR * 2 / 2 >= 1 and upstreams.pick_for(key) is preferred


async def test_requests_with_neither_adapter_nor_image_take_the_least_busy():
    upstreams = replicas(FakeBackend(), FakeBackend())
    await upstreams.refresh()
    first, second = upstreams.upstreams
    first.in_flight = 1
    assert upstreams.pick_for(request()) is second
    first.in_flight, second.in_flight = 0, 1
    assert upstreams.pick_for(request()) is first


async def test_least_busy_routing_ignores_adapter_and_image():
    upstreams = replicas(FakeBackend(), FakeBackend(), routing=LEAST_BUSY)
    await upstreams.refresh()
    first, second = upstreams.upstreams
    key = request("a", PNG_BYTES)
    first.in_flight = 1
    assert upstreams.pick_for(key) is second
    first.in_flight, second.in_flight = 0, 1
    assert upstreams.pick_for(key) is first


# ---- metrics -----------------------------------------------------------------------------


async def test_generations_and_tokens_count_per_adapter(make_client):
    client = await make_client(with_adapter())
    before = await scrape(client)
    for model in (ADAPTER, ADAPTER, SERVED_MODEL):
        body = {"model": model, "messages": HI}
        assert (await client.post("/v1/chat/completions", json=body)).status == 200
    after = await scrape(client)
    assert delta(before, after, "generations_total", model=ADAPTER) == 2
    assert delta(before, after, "generations_total", model=SERVED_MODEL) == 1
    assert delta(before, after, "completion_tokens_total", model=ADAPTER) == 6


async def test_adapter_labels_are_bounded():
    catalog = LoraCatalog(FakeBackend(), {SERVED_MODEL: TRITON_MODEL}, SERVED_MODEL)
    labels = [catalog.metrics_label(f"lora-{i}") for i in range(MAX_LABELLED_ADAPTERS + 2)]
    assert labels[-2:] == [OTHER_ADAPTERS, OTHER_ADAPTERS]
    assert len(set(labels)) == MAX_LABELLED_ADAPTERS + 1
    assert catalog.metrics_label("lora-0") == "lora-0"
    assert catalog.metrics_label(SERVED_MODEL) == SERVED_MODEL


async def test_media_items_and_cache_hits_count_per_replica():
    answers = script("a", "b")
    answers[-1] = dataclasses.replace(answers[-1], media_cache_hits=1)
    backends = FakeBackend(answers), FakeBackend(answers)
    app = create_app(TEST_CONFIG)
    app[BACKEND_KEY] = replicas(*backends, **upstream_observers(app[METRICS_KEY]))
    async with serving_app(app) as client:
        before = await scrape(client)
        body = {"model": SERVED_MODEL, "messages": IMAGE_MESSAGE}
        for _ in range(3):
            assert (await client.post("/v1/chat/completions", json=body)).status == 200
        assert (await client.post("/v1/chat/completions", json={"messages": HI})).status == 200
        after = await scrape(client)
    addresses = ("10.0.0.1:1", "10.0.0.2:1")
    with_image = [
        address
        for address, backend in zip(addresses, backends, strict=True)
        if any(request.media for request, _ in backend.requests)
    ]
    assert len(with_image) == 1  # one image: one replica
    assert delta(before, after, "upstream_media_items_total", upstream=with_image[0]) == 3
    assert delta(before, after, "upstream_media_cache_hits_total", upstream=with_image[0]) == 3

"""The deliveries the load generators send: shapes of the accepted samples, weighted.

The shapes (method, path with query, headers, body) are those of the accepted
deliveries in ``../shared/samples/deliveries.jsonl`` (a copy is built in, for a
checkout without ``shared/``). Each request gets a fresh ``x-Idempotency-Key``,
``Authorization: Bearer <token>`` (or ``?token=`` where the sample has it) and
an ``x-Timestamp``. The weights are a guess at a shop's day: stock and price
updates dominate, then orders and payments.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO.parent / "shared" / "samples" / "deliveries.jsonl"
SAMPLE_TOKEN = "dev-token"
KEY_HEADER = "x-Idempotency-Key"
DRAIN_PATH = "/bench-drain-nothing-here"
"""Where wrk's requests go once a run's measured window is over: a path that
every subject answers with 404 at once, so no request still in flight when wrk
stops can reach Kafka uncounted."""

#: Share of each event type (``entity.action``) in the mix; others get DEFAULT_WEIGHT.
TOPIC_WEIGHTS = {
    "product.update": 40.0,
    "order.create": 15.0,
    "capture.create": 10.0,
    "order.cancel": 5.0,
    "category.create": 5.0,
    "supplier.update": 5.0,
    "customer.passwordreset": 3.0,
    "brand.delete": 2.0,
}
DEFAULT_WEIGHT = 2.0

_BUILT_IN: list[dict[str, object]] = [
    {
        "method": "POST",
        "path": "/webhooks/geins",
        "headers": {"Authorization": "Bearer dev-token", "Content-Type": "application/json"},
        "body": '{"entity":"Order","action":"create","id":"12345"}',
        "topic": "geins.order.create",
    },
    {
        "method": "POST",
        "path": "/webhooks/geins",
        "headers": {"Authorization": "Bearer dev-token", "Content-Type": "application/json"},
        "body": '{"entity":"Product","action":"update","id":"12345","subEntity":"price"}',
        "topic": "geins.product.update",
    },
    {
        "method": "POST",
        "path": "/webhooks/geins/Order?action=cancel",
        "headers": {"Authorization": "Bearer dev-token", "Content-Type": "application/json"},
        "body": '{"order_id":"98765"}',
        "topic": "geins.order.cancel",
    },
    {
        "method": "POST",
        "path": "/webhooks/geins/Customer/passwordreset",
        "headers": {"Authorization": "Bearer dev-token"},
        "body": '{"id":"555","channelUrl":"https://shop.example","resetKey":"abc"}',
        "topic": "geins.customer.passwordreset",
    },
    {
        "method": "POST",
        "path": "/webhooks/geins",
        "headers": {"Authorization": "Bearer dev-token", "Content-Type": "text/plain"},
        "body": '{"entity":"Brand","action":"delete","id":"77"}',
        "topic": "geins.brand.delete",
    },
    {
        "method": "POST",
        "path": "/webhooks/geins",
        "headers": {"Authorization": "Bearer dev-token", "Content-Type": "application/json"},
        "body": '{"entity":"Product","action":"update","id":"1,2,3","subEntity":"stockBalance"}',
        "topic": "geins.product.update",
    },
    {
        "method": "GET",
        "path": "/webhooks/geins?entity=Category&action=create&id=42&environment=prod",
        "headers": {"Authorization": "Bearer dev-token"},
        "body": "",
        "topic": "geins.category.create",
    },
    {
        "method": "POST",
        "path": "/webhooks/geins?token=dev-token",
        "headers": {"Content-Type": "application/json"},
        "body": '{"entity":"Supplier","action":"update","id":"9"}',
        "topic": "geins.supplier.update",
    },
    {
        "method": "POST",
        "path": "/webhooks/geins",
        "headers": {"Authorization": "Bearer dev-token", "Content-Type": "application/json"},
        "body": (
            '{"entity":"Capture","action":"create","id":"3001",'
            '"paymentName":"Klarna","channelName":"shop.se"}'
        ),
        "topic": "geins.capture.create",
    },
]


@dataclass(frozen=True)
class Delivery:
    """One request shape; the key and timestamp are added per request."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    event_type: str  # "entity.action", lower case: the topic is <prefix>.<event_type>
    weight: float


def _delivery(raw: dict[str, object], token: str, weight_of: dict[str, float]) -> Delivery:
    headers_in = raw["headers"]
    assert isinstance(headers_in, dict)
    headers: list[tuple[str, str]] = []
    for name, value in headers_in.items():
        lower = str(name).lower()
        if lower in {"x-idempotency-key", "x-timestamp", "host", "content-length"}:
            continue
        headers.append((str(name), str(value).replace(SAMPLE_TOKEN, token)))
    event_type = str(raw["topic"]).removeprefix("geins.")
    return Delivery(
        method=str(raw["method"]),
        path=str(raw["path"]).replace(SAMPLE_TOKEN, token),
        headers=tuple(headers),
        body=str(raw["body"] or "").encode(),
        event_type=event_type,
        weight=weight_of[event_type],
    )


def load_mix(token: str, samples: Path = SAMPLES) -> tuple[list[Delivery], str]:
    """The weighted deliveries and where their shapes came from."""
    raws: list[dict[str, object]] = []
    source = f"built-in copy of the accepted samples ({samples} not found)"
    if samples.is_file():
        for line in samples.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            sample = json.loads(line)
            expect = sample.get("expect", {})
            if expect.get("status") == "2xx" and expect.get("topic"):
                raws.append({**sample, "topic": expect["topic"]})
        source = f"{samples.name}: the {len(raws)} accepted samples"
    if not raws:
        raws = _BUILT_IN
    types = [str(r["topic"]).removeprefix("geins.") for r in raws]
    # Split a type's share evenly between the samples of that type.
    weight_of = {
        t: TOPIC_WEIGHTS.get(t, DEFAULT_WEIGHT) / types.count(t) for t in dict.fromkeys(types)
    }
    return [_delivery(r, token, weight_of) for r in raws], source


def event_types(mix: Sequence[Delivery]) -> list[str]:
    return sorted({d.event_type for d in mix})


def weighted_cycle(mix: Sequence[Delivery], length: int = 200, seed: int = 4) -> list[int]:
    """Indexes into ``mix`` in a shuffled order whose frequencies follow the weights."""
    total = sum(d.weight for d in mix)
    cycle: list[int] = []
    for i, delivery in enumerate(mix):
        cycle += [i] * max(1, round(length * delivery.weight / total))
    random.Random(seed).shuffle(cycle)  # noqa: S311 - a fixed order, not a secret
    return cycle


def describe(mix: Sequence[Delivery]) -> list[tuple[str, float, str]]:
    """(event type, share in %, shape) per delivery, for the results file."""
    total = sum(d.weight for d in mix)
    rows = []
    for d in mix:
        size = f"{len(d.body)} B body" if d.body else "no body"
        rows.append((d.event_type, 100 * d.weight / total, f"{d.method} {d.path}, {size}"))
    return rows


# --------------------------------------------------------------------------
# wrk


def _lua_string(text: str) -> str:
    out = []
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 32 <= code < 127:
            out.append(ch)
        else:
            out.extend(f"\\{b}" for b in ch.encode())
    return '"' + "".join(out) + '"'


WRK_SCRIPT = """\
-- Generated by tests/bench/mix.py for one wrk run; see tests/bench/README.md.
-- Each request is a template with a fresh x-Idempotency-Key spliced in
-- (run id + thread id + counter). After MAIN_SECONDS every request goes to the
-- drain path (404 everywhere), so that nothing wrk abandons at its stop was a
-- webhook: the 2xx count is then exact (answers - answers >= 400).
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now()
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

local MAIN_SECONDS = %(main_seconds)s
local RUN_ID = %(run_id)s
local HEADS = {%(heads)s}
local TAILS = {%(tails)s}
local CYCLE = {%(cycle)s}
local NCYCLE = #CYCLE
local DRAIN = %(drain)s
local DRAIN_DELAY_MS = 50

-- Several ports: one per subject process (replicas); wrk thread i talks to port
-- i (round robin), so the connections are split evenly between them.
local PORTS = {%(ports)s}
local threads = {}
local next_tid = 0
function setup(thread)
  next_tid = next_tid + 1
  thread:set("tid", next_tid)
  if #PORTS > 1 then
    thread.addr = wrk.lookup(%(host)s, PORTS[((next_tid - 1) %% #PORTS) + 1])[1]
  end
  table.insert(threads, thread)
end

-- per thread (globals, so that done() can read them with thread:get)
sent = 0
drained = 0
t_first = 0
t_switch = 0
local switch_at = nil
local key_prefix = nil

function request()
  local t = now()
  if switch_at == nil then
    t_first = t
    switch_at = t + MAIN_SECONDS
    key_prefix = RUN_ID .. "-" .. tid .. "-"
  end
  if t >= switch_at then
    if drained == 0 then t_switch = t end
    drained = drained + 1
    return DRAIN
  end
  sent = sent + 1
  local i = CYCLE[(sent %% NCYCLE) + 1]
  return HEADS[i] .. key_prefix .. sent .. TAILS[i]
end

-- While draining, each connection waits between requests: the drain only
-- has to outlast the answers still on their way, not load the subject.
function delay()
  if drained > 0 then return DRAIN_DELAY_MS end
  return 0
end

function done(summary, latency, requests)
  local out = io.open(%(result_path)s, "w")
  local s, d, first, switch = 0, 0, nil, nil
  for _, thread in ipairs(threads) do
    s = s + thread:get("sent")
    d = d + thread:get("drained")
    local f, w = thread:get("t_first"), thread:get("t_switch")
    if f > 0 and (first == nil or f < first) then first = f end
    if w > 0 and (switch == nil or w > switch) then switch = w end
  end
  -- wrk calls request() once before the run to check it (on the first
  -- thread) and never sends that request: it does not count.
  s = s - 1
  out:write(string.format(
    '{"sent": %%d, "drained": %%d, "first": %%.6f, "switch": %%.6f, "responses": %%d, ' ..
    '"status_errors": %%d, "connect_errors": %%d, "read_errors": %%d, "write_errors": %%d, ' ..
    '"timeouts": %%d, "duration_us": %%d}\\n',
    s, d, first or 0, switch or 0, summary.requests, summary.errors.status,
    summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.timeout, summary.duration))
  out:close()
end
"""


def wrk_script(
    mix: Sequence[Delivery],
    *,
    host: str,
    port: int,
    main_seconds: float,
    run_id: str,
    timestamp: str,
    result_path: Path,
    ports: Sequence[int] = (),
) -> str:
    """A wrk Lua script that sends the mix for ``main_seconds``, then drains.

    With more than one of ``ports``, wrk's threads are spread over them (run wrk with
    as many threads as ports); otherwise every connection goes to the URL given to wrk.
    """
    heads, tails = [], []
    for d in mix:
        lines = [f"{d.method} {d.path} HTTP/1.1", f"Host: {host}:{port}"]
        lines += [f"{name}: {value}" for name, value in d.headers]
        lines.append(f"x-Timestamp: {timestamp}")
        if d.body or d.method != "GET":
            lines.append(f"Content-Length: {len(d.body)}")
        heads.append(_lua_string("\r\n".join(lines) + f"\r\n{KEY_HEADER}: "))
        tails.append(_lua_string("\r\n\r\n" + d.body.decode()))
    drain = f"GET {DRAIN_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n"
    cycle = weighted_cycle(mix)
    return WRK_SCRIPT % {
        "main_seconds": f"{main_seconds:.3f}",
        "run_id": _lua_string(run_id),
        "heads": ", ".join(heads),
        "tails": ", ".join(tails),
        "cycle": ", ".join(str(i + 1) for i in cycle),
        "drain": _lua_string(drain),
        "result_path": _lua_string(str(result_path)),
        "host": _lua_string(host),
        "ports": ", ".join(_lua_string(str(p)) for p in ports),
    }


# --------------------------------------------------------------------------
# vegeta


def vegeta_targets(
    mix: Sequence[Delivery], *, base_url: str, count: int, run_id: str, timestamp: str
) -> Iterator[str]:
    """``count`` vegeta JSON targets (one per line), each with a fresh key."""
    cycle = weighted_cycle(mix)
    encoded = [base64.b64encode(d.body).decode() for d in mix]
    for n in range(count):
        i = cycle[n % len(cycle)]
        d = mix[i]
        header: dict[str, list[str]] = {name: [value] for name, value in d.headers}
        header["x-Timestamp"] = [timestamp]
        header[KEY_HEADER] = [f"{run_id}-v-{n}"]
        target: dict[str, object] = {"method": d.method, "url": base_url + d.path, "header": header}
        if d.body:
            target["body"] = encoded[i]
        yield json.dumps(target, separators=(",", ":"))

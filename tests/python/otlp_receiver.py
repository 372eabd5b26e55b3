"""An OTLP collector for tests: decodes the real protobuf messages so tests assert
on what a real collector would see, not on what the gateway meant to send."""

import gzip
import http.server
import pathlib
import selectors
import socket
import threading
import time

from google.protobuf import text_format
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as mpb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as tpb
from opentelemetry.proto.trace.v1 import trace_pb2

# path -> (signal, request type, response type); shared by both transports.
ROUTES = {
    "/v1/traces": ("traces", tpb.ExportTraceServiceRequest, tpb.ExportTraceServiceResponse),
    "/v1/metrics": ("metrics", mpb.ExportMetricsServiceRequest, mpb.ExportMetricsServiceResponse),
}


def _value(v):
    """AnyValue -> plain Python; kvlists become dicts so nested attributes stay comparable."""
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return _attrs(v.kvlist_value.values)
    return getattr(v, kind) if kind else None


def _attrs(kvs):
    return {kv.key: _value(kv.value) for kv in kvs}


def _freeze(v):
    # Attribute values may be lists/dicts; latest_metrics() needs them hashable.
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return frozenset((k, _freeze(x)) for k, x in v.items())
    return v


def _spans(req):
    for rs in req.resource_spans:
        resource = _attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                yield {
                    "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                    "parent_span_id": s.parent_span_id.hex(), "name": s.name,
                    "kind": trace_pb2.Span.SpanKind.Name(s.kind).removeprefix("SPAN_KIND_"),
                    "attributes": _attrs(s.attributes),
                    "status_code": trace_pb2.Status.StatusCode.Name(s.status.code).removeprefix("STATUS_CODE_"),
                    "status_message": s.status.message,
                    "events": [{"name": e.name, "attributes": _attrs(e.attributes)} for e in s.events],
                    "resource": resource, "scope": ss.scope.name,
                    "start_ns": s.start_time_unix_nano, "end_ns": s.end_time_unix_nano,
                }


def _points(req):
    for rm in req.resource_metrics:
        resource = _attrs(rm.resource.attributes)
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                # Exponential histograms and summaries are not expected from the gateway;
                # they still land in dump_dir and requests().
                if kind not in ("sum", "gauge", "histogram"):
                    continue
                for p in getattr(m, kind).data_points:
                    d = {"name": m.name, "kind": kind, "unit": m.unit, "attributes": _attrs(p.attributes),
                         "resource": resource, "time_ns": p.time_unix_nano}
                    if kind == "histogram":
                        d.update(count=p.count, sum=p.sum, bucket_counts=list(p.bucket_counts),
                                 explicit_bounds=list(p.explicit_bounds))
                    else:
                        d["value"] = getattr(p, p.WhichOneof("value") or "as_int")
                    yield d


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # exporters reuse connections; 1.0 would close each one

    def log_message(self, *args):  # keep test output quiet
        pass

    def _body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _reply(self, status, body, ctype="text/plain"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self._body()  # always drain, or the next keep-alive request is garbage
        headers = {k.lower(): v for k, v in self.headers.items()}
        route = ROUTES.get(self.path.split("?")[0])
        self.server.receiver._note_headers("http", self.path, headers)
        if route is None:
            return self._reply(404, b"not found")
        # JSON OTLP is legal but unsupported here: a loud 415 beats a silent misparse.
        if headers.get("content-type", "").split(";")[0].strip() != "application/x-protobuf":
            return self._reply(415, b"only application/x-protobuf")
        try:
            encoding = headers.get("content-encoding", "identity").lower()
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding != "identity":
                return self._reply(415, b"unsupported content-encoding")
            msg = route[1].FromString(body)
        except Exception as e:  # a malformed export must fail the test, not hang it
            return self._reply(400, str(e).encode())
        self.server.receiver._record(route[0], "http", msg)
        self._reply(200, route[2]().SerializeToString(), "application/x-protobuf")


class Receiver:
    """OTLP/HTTP (always) and OTLP/gRPC (grpc=True) collector on loopback, OS-chosen ports."""

    def __init__(self, grpc=False, dump_dir=None):
        self._want_grpc = grpc
        self._dump_dir = pathlib.Path(dump_dir) if dump_dir else None
        self._lock = threading.Lock()
        self._requests, self._headers, self._spans, self._points = [], [], [], []
        self._http = self._grpc = None

    def start(self):
        if self._dump_dir:
            self._dump_dir.mkdir(parents=True, exist_ok=True)
        self._http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._http.receiver = self
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        if self._want_grpc:
            self._start_grpc()
        return self

    def _start_grpc(self):
        # Imported here so HTTP-only users don't pay for (or need) grpcio.
        from concurrent import futures
        import grpc
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as mgrpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as tgrpc

        rx = self

        def servicer(base, path):
            signal, _, response = ROUTES[path]

            def export(_self, request, context):
                rx._note_headers("grpc", path, {m.key.lower(): m.value for m in context.invocation_metadata()})
                rx._record(signal, "grpc", request)
                return response()
            return type(base.__name__, (base,), {"Export": export})()

        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        tgrpc.add_TraceServiceServicer_to_server(servicer(tgrpc.TraceServiceServicer, "/v1/traces"), self._grpc)
        mgrpc.add_MetricsServiceServicer_to_server(servicer(mgrpc.MetricsServiceServicer, "/v1/metrics"), self._grpc)
        self._grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")
        self._grpc.start()

    def stop(self):
        if self._http:
            self._http.shutdown()
            self._http.server_close()
        if self._grpc:
            self._grpc.stop(grace=None)
        self._http = self._grpc = None

    __enter__ = start

    def __exit__(self, *exc):
        self.stop()

    @property
    def http_endpoint(self):
        return f"http://127.0.0.1:{self._http.server_address[1]}"

    @property
    def grpc_endpoint(self):
        return f"http://127.0.0.1:{self._grpc_port}"

    def _note_headers(self, transport, path, headers):
        with self._lock:
            self._headers.append({"transport": transport, "path": path, "headers": headers})

    def _record(self, signal, transport, msg):
        with self._lock:
            self._requests.append({"signal": signal, "transport": transport, "message": msg})
            n = len(self._requests)
            self._spans.extend(_spans(msg) if signal == "traces" else ())
            self._points.extend(_points(msg) if signal == "metrics" else ())
        if self._dump_dir:
            # Text format keeps every string verbatim, so a grep for secrets sees all of it.
            (self._dump_dir / f"{n:04d}-{signal}-{transport}.txt").write_text(text_format.MessageToString(msg))

    def requests(self):
        """Every decoded export: dicts with signal, transport and the protobuf message."""
        with self._lock:
            return list(self._requests)

    def headers(self):
        """Headers of every request received, routed or not: dicts of transport, path, headers."""
        with self._lock:
            return list(self._headers)

    def spans(self):
        with self._lock:
            return list(self._spans)

    def metrics(self):
        """One dict per data point, in arrival order (cumulative series repeat)."""
        with self._lock:
            return list(self._points)

    def latest_metrics(self):
        """Cumulative exports repeat every point; keep only the newest per series."""
        latest = {}
        for p in self.metrics():
            latest[(p["name"], _freeze(p["attributes"]))] = p
        return list(latest.values())

    def wait_for(self, predicate, timeout=20):
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() > deadline:
                raise AssertionError(f"OTLP receiver: condition not met in {timeout}s; {self.summary()}")
            time.sleep(0.05)
        return self

    def summary(self):
        return (f"{len(self.requests())} exports, {len(self.headers())} requests; "
                f"spans={sorted({s['name'] for s in self.spans()})}; "
                f"metrics={sorted({p['name'] for p in self.metrics()})}")


class SilentServer:
    """Accepts TCP connections and reads them but never answers: a collector that hangs."""

    def __init__(self):
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._sock, selectors.EVENT_READ)
        self._conns, self._stop = [], threading.Event()
        self.bytes_received = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            for key, _ in self._sel.select(timeout=0.1):
                if key.fileobj is self._sock:
                    conn, _ = self._sock.accept()
                    conn.setblocking(False)
                    self._conns.append(conn)
                    self._sel.register(conn, selectors.EVENT_READ)
                    continue
                # Read so the client's writes never block; the hang must be the missing reply.
                try:
                    data = key.fileobj.recv(65536)
                except OSError:  # a reset peer must not kill the loop serving the others
                    data = b""
                self.bytes_received += len(data)
                if not data:  # a closed peer stays readable forever; stop polling it
                    self._sel.unregister(key.fileobj)

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=5)
        for s in [*self._conns, self._sock]:
            s.close()
        self._sel.close()

    __enter__ = start

    def __exit__(self, *exc):
        self.stop()

    @property
    def connections(self):
        return len(self._conns)

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

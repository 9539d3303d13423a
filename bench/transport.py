"""Transport alone: one envelope per unary call, several per unary call, or a stream.

    .venv/bin/python bench/transport.py --count 20000 --in-flight 64

Measures, over mutual TLS on loopback with the server and the client in two
processes (as ``bench/bench.py``'s floor), how many 700-byte envelopes a second
cross and come back, and the CPU time both processes spend per envelope, for:

* ``unary``: one ``Deliver`` call per envelope (the floor of ``bench/bench.py``);
* ``batch K``: ``DeliverBatch`` calls of K envelopes each, as many calls in
  flight as make ``--in-flight`` envelopes;
* ``stream``: one bidirectional stream carrying every envelope, ``--in-flight``
  of them unanswered at a time, each answered by one message in order.

It chose between a batch RPC and a stream for ``DeliverBatch``
(docs/DESIGN.md, docs/PERFORMANCE.md "Round 3"). Not a test; prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import tempfile
import time
from pathlib import Path
from typing import Any

import bench  # the script's own directory is on the path
import grpc
import grpc.aio

from itmolink.crypto.pki import PartyFiles, init_party
from itmolink.v1 import partner_service_pb2, partner_service_pb2_grpc

STREAM = "/bench.Transport/Stream"


class Echo(partner_service_pb2_grpc.PartnerServiceServicer):
    async def Deliver(self, request: Any, context: Any) -> Any:
        return partner_service_pb2.DeliverResponse(envelope=request.envelope)

    async def DeliverBatch(self, request: Any, context: Any) -> Any:
        return partner_service_pb2.DeliverBatchResponse(
            outcomes=[partner_service_pb2.DeliverOutcome(envelope=e) for e in request.envelopes]
        )


async def stream_echo(requests: Any, context: Any) -> Any:
    async for request in requests:
        yield request


def server(keys: PartyFiles, port: int, stop: Any, out: Any) -> None:
    async def serve() -> None:
        srv = grpc.aio.server()
        partner_service_pb2_grpc.add_PartnerServiceServicer_to_server(Echo(), srv)
        handler = grpc.stream_stream_rpc_method_handler(stream_echo)  # bytes in, bytes out
        srv.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("bench.Transport", {"Stream": handler}),)
        )
        credentials = grpc.ssl_server_credentials(
            [(keys.node_key.read_bytes(), keys.node_certificate.read_bytes())],
            root_certificates=keys.ca_certificate.read_bytes(),
            require_client_auth=True,
        )
        srv.add_secure_port(f"127.0.0.1:{port}", credentials)
        await srv.start()
        loop = asyncio.get_running_loop()
        while True:
            command = await loop.run_in_executor(None, stop.get)
            if command == "stop":
                break
            out.put(time.process_time())
        await srv.stop(None)

    asyncio.run(serve())


async def run_client(
    keys: PartyFiles, port: int, mode: str, size: int, count: int, in_flight: int
) -> float:
    channel = grpc.aio.secure_channel(
        f"127.0.0.1:{port}",
        grpc.ssl_channel_credentials(
            root_certificates=keys.ca_certificate.read_bytes(),
            private_key=keys.node_key.read_bytes(),
            certificate_chain=keys.node_certificate.read_bytes(),
        ),
    )
    stub = partner_service_pb2_grpc.PartnerServiceStub(channel)
    envelope = b"x" * bench.PAYLOAD
    await stub.Deliver(partner_service_pb2.DeliverRequest(envelope=envelope))  # connect
    started = time.perf_counter()
    if mode == "unary":
        request = partner_service_pb2.DeliverRequest(envelope=envelope)
        calls = iter(range(count))

        async def unary_worker() -> None:
            for _ in calls:
                await stub.Deliver(request)

        await asyncio.gather(*(unary_worker() for _ in range(in_flight)))
    elif mode == "batch":
        batch = partner_service_pb2.DeliverBatchRequest(envelopes=[envelope] * size)
        batches = iter(range(count // size))

        async def batch_worker() -> None:
            for _ in batches:
                response = await stub.DeliverBatch(batch)
                assert len(response.outcomes) == size

        await asyncio.gather(*(batch_worker() for _ in range(max(1, in_flight // size))))
    else:
        call = channel.stream_stream(STREAM, None, None)(None)
        window = asyncio.Semaphore(in_flight)

        async def writer() -> None:
            for _ in range(count):
                await window.acquire()
                await call.write(envelope)
            await call.done_writing()

        async def reader() -> None:
            for _ in range(count):
                await call.read()
                window.release()

        await asyncio.gather(writer(), reader())
    elapsed = time.perf_counter() - started
    await channel.close(None)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/transport.py")
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--sizes", default="2,4,8,16,32")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        keys = init_party(Path(tmp) / "pki", "ECH", "ECH-NR", now=bench.NOW)
        port = bench.free_port()
        stop, out = ctx.Queue(), ctx.Queue()
        srv = ctx.Process(target=server, args=(keys, port, stop, out))
        srv.start()
        time.sleep(1.0)
        modes = [("unary", 1)] + [("batch", int(s)) for s in args.sizes.split(",")]
        modes.append(("stream", 1))
        print(f"{args.count} envelopes of {bench.PAYLOAD} bytes, {args.in_flight} in flight")
        for mode, size in modes:
            stop.put("cpu")
            server_cpu = out.get()
            client_cpu = time.process_time()
            elapsed = asyncio.run(run_client(keys, port, mode, size, args.count, args.in_flight))
            client_cpu = time.process_time() - client_cpu
            stop.put("cpu")
            server_cpu = out.get() - server_cpu
            label = f"batch of {size}" if mode == "batch" else mode
            done = args.count // size * size
            print(
                f"{label:>12}: {done / elapsed:8.0f} envelopes/s, CPU per envelope "
                f"client {client_cpu / done * 1e3:.3f} ms, server {server_cpu / done * 1e3:.3f} ms"
            )
        stop.put("stop")
        srv.join()


if __name__ == "__main__":
    main()

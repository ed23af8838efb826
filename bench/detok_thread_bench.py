"""Where should the engine process's front end detokenize: on the receiver thread or on the
event loop? (issue 36)

The front end's real per-request code (proc/outputs.py InFlight: TextStream + the output's
rebuild) with the default model's tokenizer: a producer thread stands in for the receiver
thread and hands one output per request per step (batch B, a step every 5 ms) to each request's
asyncio queue, which the event loop drains. Variant *receiver thread*: receive() runs on the
producer before the hand-over (what ProcessEngine does); *event loop*: the raw output is handed
over and receive() runs after queue.get(). Measured: the CPU time of each thread per output
(time.thread_time, so other processes' load does not count) and the event loop's lag (lateness
of a 1 ms timer). Variants alternate within each round.

Usage: python bench/detok_thread_bench.py [--batches 16 64] [--rounds 3] [--steps 200]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine_line  # noqa: E402
from loraplex.server.engine.io import RequestOutput, Timing  # noqa: E402
from loraplex.server.engine.proc.outputs import InFlight  # noqa: E402
from loraplex.server.engine.prompt import load_tokenizer  # noqa: E402
from loraplex.server.model.default_model import ensure_default_model  # noqa: E402

STEP_S = 0.005
TEXT = "The quick brown fox jumps over the lazy dog; café €12 «漢字» naïve 🚀. " * 40


async def one_run(tokenizer, ids: list[int], batch: int, steps: int, on_receiver: bool) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    flights = {f"r{i}": InFlight(loop, asyncio.Queue(), tokenizer, ids[:5], ("zzq", "never"))
               for i in range(batch)}
    cpu: dict[str, float] = {}

    def producer() -> None:
        start = time.thread_time()
        for step in range(steps):
            for index, (request_id, flight) in enumerate(flights.items()):
                output = RequestOutput(request_id, "", (ids[(step + index) % len(ids)],), prompt_tokens=5,
                                       generated_tokens=step + 1, timing=Timing())
                if on_receiver:
                    flight.put(flight.receive(output))
                else:
                    loop.call_soon_threadsafe(flight.queue.put_nowait, output)
            time.sleep(STEP_S)
        cpu["receiver"] = time.thread_time() - start

    async def consume(flight: InFlight) -> None:
        for _ in range(steps):
            item = await flight.queue.get()
            if not on_receiver:
                flight.receive(item)

    lags: list[float] = []
    done = False

    async def probe() -> None:
        while not done:
            start = loop.time()
            await asyncio.sleep(0.001)
            lags.append(loop.time() - start - 0.001)

    prober = asyncio.ensure_future(probe())
    thread = threading.Thread(target=producer)
    start = time.thread_time()
    thread.start()
    await asyncio.gather(*(consume(flight) for flight in flights.values()))
    cpu["loop"] = time.thread_time() - start
    done = True
    await prober
    thread.join()
    lags.sort()
    outputs = batch * steps
    return {"loop_us": cpu["loop"] / outputs * 1e6, "receiver_us": cpu["receiver"] / outputs * 1e6,
            "lag_p50_ms": lags[len(lags) // 2] * 1e3, "lag_p99_ms": lags[int(len(lags) * 0.99)] * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    tokenizer = load_tokenizer(ensure_default_model(log=lambda _m: None))
    ids = tokenizer(TEXT)["input_ids"]
    print(machine_line())
    print("| batch | round | variant | loop thread CPU us/output | receiver thread CPU us/output | sum | loop lag p50 / p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batches:
        for round_index in range(args.rounds):
            for on_receiver in (True, False):
                got = asyncio.run(one_run(tokenizer, ids, batch, args.steps, on_receiver))
                name = "receiver thread" if on_receiver else "event loop"
                print(f"| {batch} | {round_index + 1} | {name} | {got['loop_us']:.1f} | {got['receiver_us']:.1f} | "
                      f"{got['loop_us'] + got['receiver_us']:.1f} | {got['lag_p50_ms']:.2f} / {got['lag_p99_ms']:.2f} |")


if __name__ == "__main__":
    main()

"""`python -m agentkd.teachers.sim --port P`: serve the simulated teacher standalone."""

from __future__ import annotations

import argparse

from agentkd.config import SimSection
from agentkd.teachers.sim.server import serve_forever


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m agentkd.teachers.sim", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rpm", type=int, default=None, help="requests/min limit")
    parser.add_argument("--tpm", type=int, default=None, help="tokens/min limit")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()
    settings = SimSection(rpm=args.rpm, tpm=args.tpm, latency_ms=args.latency_ms)
    serve_forever(settings, port=args.port, seed=args.seed)


if __name__ == "__main__":
    main()

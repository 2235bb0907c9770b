"""``python -m examples.gateway [--backend asyncio|trio] [--host 127.0.0.1] [--port 8000]``.

The same as ``hypercorn examples.gateway.app:app [--worker-class trio]``, in one process.
"""

from __future__ import annotations

import argparse
import signal
from functools import partial

import anyio
from hypercorn.config import Config

from .app import create_app


async def until_signalled() -> None:
    """Ctrl-C or SIGTERM: Hypercorn then shuts down, and every run stops with its request."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.gateway", description=__doc__)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--trace-root", default="log/gateway", help="where run sessions go")
    args = parser.parse_args(argv)
    config = Config()
    config.bind = [f"{args.host}:{args.port}"]
    config.accesslog = "-"
    app = create_app(args.trace_root)
    print(f"serving on http://{args.host}:{args.port}/ with {args.backend}; Ctrl-C stops")
    if args.backend == "trio":
        import trio
        from hypercorn.trio import serve as trio_serve

        trio.run(partial(trio_serve, app, config, shutdown_trigger=until_signalled))  # type: ignore[arg-type]
    else:
        import asyncio

        from hypercorn.asyncio import serve as asyncio_serve

        asyncio.run(asyncio_serve(app, config, shutdown_trigger=until_signalled))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()

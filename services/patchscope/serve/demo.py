"""`make run`: start the service, send one Explain through the client, print the stream, stop.

    python -m patchscope.serve.demo "Barack Obama" --source smollm2-135m --target gemma3-270m --layers 2,6,10

The request goes through `patchscope-client` exactly as `patchscope-client explain` sends it: a live view
of the stream in a terminal, then the table of answers.
"""

from __future__ import annotations

import argparse
import sys

from patchscope.serve.local import DEFAULT_SERVE_CONFIG, free_port, read_config, start
from patchscope_client import cli as client_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m patchscope.serve.demo", description=__doc__)
    parser.add_argument("prompt")
    parser.add_argument("--source", default="smollm2-135m")
    parser.add_argument("--target", default="gemma3-270m")
    parser.add_argument("--layers", default="2,6,10")
    parser.add_argument("--config", default=DEFAULT_SERVE_CONFIG)
    parser.add_argument("--max-new-tokens", type=int, default=10)
    args = parser.parse_args(argv)

    def progress(message: str) -> None:
        print(f"[patchscope] {message}", file=sys.stderr, flush=True)

    service = start(read_config(args.config), grpc_port=free_port(), http_port=free_port(), progress=progress)
    try:
        print(f"service at {service.address}; sending one Explain through patchscope-client", flush=True)
        return client_cli.main(
            [
                "--address",
                service.address,
                "explain",
                args.prompt,
                "--source",
                args.source,
                "--target",
                args.target,
                "--layers",
                args.layers,
                "--max-new-tokens",
                str(args.max_new_tokens),
            ]
        )
    finally:
        service.stop()


if __name__ == "__main__":
    sys.exit(main())

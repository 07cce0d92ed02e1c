"""`make run`: start the service, send one Explain through the generated stub, print the stream, stop.

python -m patchscope.serve.demo "Barack Obama" --source smollm2-135m --target gemma3-270m --layers 2,6,10
"""

from __future__ import annotations

import argparse
import sys
import time

import grpc

from patchscope.cli import DEFAULT_SERVE_CONFIG, parse_int_list
from patchscope.serve.local import free_port, read_config, start
from patchscope.wire import pb, pb_grpc


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
        with grpc.insecure_channel(service.address) as channel:
            stub = pb_grpc.PatchscopeStub(channel)
            models = stub.ListModels(pb.ListModelsRequest(), timeout=60)
            print(f"service at {service.address}: API {models.api_version}, server {models.server_version}")
            request = pb.ExplainRequest(
                source=args.source,
                prompt=args.prompt,
                layers=parse_int_list(args.layers),
                target=pb.TargetSpec(
                    model=args.target, generation=pb.GenerationOptions(max_new_tokens=args.max_new_tokens)
                ),
            )
            sent, first, tokens = time.time(), None, 0
            for event in stub.Explain(request, timeout=600):
                site = event.site
                label = f"L{site.source_layer:>2}→{site.target_layer:<2} {site.source_token!r}"
                kind = event.WhichOneof("event")
                if kind == "started":
                    s = event.started
                    r2 = f"R² {s.mapping_r2:.3f}" if s.HasField("mapping_r2") else "identity"
                    print(
                        f"{label}  started: {s.mapping_id or 'same model'} ({r2}), "
                        f"norm {s.mapped_norm:.1f} vs layer {s.target_layer_norm:.1f}"
                    )
                elif kind == "token":
                    tokens += 1
                    first = first or time.time() - sent
                else:
                    f = event.finished
                    print(
                        f"{label}  answer {f.answer!r}  explanation {f.explanation!r}  "
                        f"({f.timings.total_s:.2f} s)"
                    )
            print(
                f"{tokens} token events streamed; first after {first or 0:.2f} s, "
                f"all in {time.time() - sent:.2f} s"
            )
    finally:
        service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

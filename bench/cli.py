"""`offramp bench serve` (HTTP load against a running server) and `offramp bench quality`
(on-policy agreement of early exit with the full model, per epsilon)."""


def register(subparsers):
    from bench import quality, serve

    bench = subparsers.add_parser("bench", help="benchmark a running server, or early exit's quality")
    commands = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    serve_parser = commands.add_parser("serve", help="streaming load against the HTTP API, vLLM's metrics "
                                       "plus exit shares and compute saved")
    serve.add_arguments(serve_parser)
    serve_parser.set_defaults(func=serve.run)
    quality_parser = commands.add_parser("quality", help="per epsilon: on-policy agreement with the full model, "
                                         "first divergence, compute saved; JSON and a plot")
    quality.add_arguments(quality_parser)
    quality_parser.set_defaults(func=quality.run)

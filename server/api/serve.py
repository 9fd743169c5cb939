"""`offramp serve`: the OpenAI-compatible HTTP server (FastAPI on uvicorn).

Start-up order: bind the port first, then load the model on a thread. Until the engine runs,
/health and every /v1 route answer 503, so a container's HEALTHCHECK reports "starting" rather
than "refused", and a load failure still ends the process with status 1 and one clear line.
On SIGTERM uvicorn stops accepting, in-flight requests (streams included) finish for up to
--shutdown-timeout seconds, then the engine stops and the process exits 0.
"""
import logging
import signal
import threading

from server.model.fetch import DEFAULT_MODEL

log = logging.getLogger("offramp.serve")


def register(subparsers):
    p = subparsers.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    p.add_argument("--model", default=DEFAULT_MODEL, help="alias, Hugging Face folder, or .gguf file")
    p.add_argument("--heads", default="auto",
                   help="exit-head folder; 'auto' = the heads shipped for the model, if any; 'none' = no early exit")
    p.add_argument("--tune", default=None,
                   help="folder written by 'offramp tune': serve the model with its delta merged (and, with "
                        "--heads auto, its heads)")
    p.add_argument("--gate-whole-batch", action="store_true",
                   help="ask a gated exit head only when every decode row's gate passes (a request's exits then "
                        "depend on the batch; default: each row whose gate passes asks, batch-invariant)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--quantization", default="none", choices=["auto", "none", "int8", "int4"],
                   help="weights in memory (int8/int4: CPU only); auto = int4 on CPU, none on CUDA")
    p.add_argument("--max-num-seqs", type=int, default=None, help="sequences decoded together in one step")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens computed in one step (default 1024, at least --max-num-seqs); bounds how long a "
                        "step, and so an abort or a new request's first token, can wait")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + generated tokens per sequence")
    p.add_argument("--kv-cache-memory", default=None, help="KV pool size, e.g. 2GiB (default: 1 GiB on CPU, "
                   "90%% of free GPU memory on CUDA)")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="requests allowed to wait for their first token; more get 429")
    p.add_argument("--max-body-size", default=None, help="largest request body (default 32MiB); larger gets 413")
    p.add_argument("--max-prompts-per-request", type=int, default=None,
                   help="prompts in one /v1/completions request (default 256); more get 400")
    p.add_argument("--max-request-tokens", type=int, default=None,
                   help="prompt + max_tokens over all sequences of one request (default 1048576); more get 400")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: the model's)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run_serve)


def engine_config(args):
    from server.engine.config import EngineConfig, parse_memory

    heads = None if args.heads.lower() == "none" else args.heads
    kwargs = dict(model=args.model, heads=heads, tune=args.tune, gate_whole_batch=args.gate_whole_batch,
                  device=args.device, dtype=args.dtype, quantization=args.quantization,
                  max_model_len=args.max_model_len,
                  kv_cache_memory=parse_memory(args.kv_cache_memory) if args.kv_cache_memory else None)
    if args.max_num_seqs is not None:
        kwargs["max_num_seqs"] = args.max_num_seqs
        # every running sequence decodes each step, so the token budget grows with it
        kwargs["max_num_batched_tokens"] = max(EngineConfig.max_num_batched_tokens, args.max_num_seqs)
    if args.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    return EngineConfig(**kwargs)


def request_limits(args):
    from server.api.limits import RequestLimits
    from server.engine.config import parse_memory

    given = dict(max_body_bytes=parse_memory(args.max_body_size) if args.max_body_size else None,
                 max_prompts=args.max_prompts_per_request, max_request_tokens=args.max_request_tokens)
    return RequestLimits(**{name: value for name, value in given.items() if value is not None})


def run_serve(args) -> int:
    import uvicorn

    from server.api.app import ServerState, build_app
    from server.api.engine_client import start_engine

    if not 0 <= args.port < 65536:
        raise ValueError(f"--port {args.port} is not a port number")
    if args.max_waiting < 1:
        raise ValueError("--max-waiting must be at least 1")
    config = engine_config(args)  # fails fast, before the port is bound, on a bad flag
    state = ServerState(api_key=args.api_key, max_waiting=args.max_waiting, limits=request_limits(args))
    server = uvicorn.Server(uvicorn.Config(build_app(state), host=args.host, port=args.port, log_config=None,
                                           log_level=args.log_level, timeout_graceful_shutdown=args.shutdown_timeout))
    failures: list[BaseException] = []

    def load():
        try:
            engine, info, metrics = start_engine(config, args.served_model_name)
            state.set_engine(engine, info, metrics)
            log.info("ready: http://%s:%d/v1 (model %r)", args.host, args.port, info.name)
        except BaseException as err:
            failures.append(err)
            server.should_exit = True

    threading.Thread(target=load, name="offramp-load", daemon=True).start()
    # uvicorn handles SIGTERM while it runs, then re-raises it to the handler it found: make that
    # one a no-op so a graceful stop ends with status 0 instead of death by signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        if state.engine is not None:
            state.engine.shutdown()
    if failures:
        raise failures[0]
    log.info("stopped")
    return 0

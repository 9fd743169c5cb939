"""Starting the engine for the server, and what the server learns from it: the model's facts
(ModelInfo), the metrics observer, and the start-up log, one line per fact."""
import logging
from pathlib import Path

from server.api.serving import ModelInfo
from server.engine.async_engine import AsyncLLMEngine
from server.engine.config import EngineConfig
from server.metrics import Metrics
from server.model.fetch import ALIASES

log = logging.getLogger("offramp.serve")


def default_model_name(spec: str) -> str:
    """An alias names itself; a folder or a .gguf file is named by its last path part (without .gguf)."""
    if spec in ALIASES:
        return spec
    path = Path(spec)
    return path.stem if path.suffix == ".gguf" else path.name


def model_info(engine: AsyncLLMEngine, name: str) -> ModelInfo:
    heads = engine.heads
    return ModelInfo(name=name, tokenizer=engine.tokenizer, vocab_size=engine.model_config.vocab_size,
                     num_hidden_layers=engine.model_config.num_hidden_layers, max_model_len=engine.max_model_len,
                     exit_layers=list(heads.layers) if heads is not None else [], epsilons=engine.epsilons,
                     default_epsilon=engine.default_epsilon)


def scheduler_state(engine: AsyncLLMEngine) -> tuple[int, int, float]:
    """(running, waiting, KV usage) now. Steps report these too, but an idle engine takes no steps, so
    a scrape after the last request left must not show that request's blocks."""
    return engine.scheduler_state()


def start_engine(config: EngineConfig, served_model_name: str | None = None,
                 process_metrics: bool = True) -> tuple[AsyncLLMEngine, ModelInfo, Metrics]:
    """Load the model (the loader shows a progress bar while fetching), start the engine loop and
    attach the metrics observer."""
    log.info("loading model %s", config.model)
    engine = AsyncLLMEngine.from_config(config)
    info = model_info(engine, served_model_name or default_model_name(config.model))
    metrics = Metrics(info.name, info.exit_layers, info.num_hidden_layers, process_metrics=process_metrics)
    engine.observer = metrics
    log_facts(config, info, engine)
    return engine, info, metrics


def log_facts(config: EngineConfig, info: ModelInfo, engine: AsyncLLMEngine) -> None:
    dtype = str(config.torch_dtype).removeprefix("torch.")
    source = f" ({config.model})" if config.model != info.name else ""
    log.info("model: %s%s, %d layers, vocabulary %d", info.name, source, info.num_hidden_layers, info.vocab_size)
    log.info("device: %s", config.torch_device)
    log.info("dtype: %s", dtype)
    if info.exit_layers:
        log.info("exit layers: %s (full depth: %d)", ", ".join(map(str, info.exit_layers)), info.num_hidden_layers)
        default = f"{info.default_epsilon:g}" if info.default_epsilon is not None else "none"
        log.info("exit epsilons: %s (default %s)", ", ".join(f"{e:g}" for e in info.epsilons) or "none", default)
    else:
        log.info("exit layers: none (no exit heads: every token at full depth)")
    log.info("KV cache capacity: %d tokens", engine.kv_capacity_tokens)
    log.info("max model length: %d tokens; max running sequences: %d", info.max_model_len, config.max_num_seqs)
